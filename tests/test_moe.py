"""Mixture-of-experts models: LoRA adapts the fused expert parameters (not the router unless named), a step trains
them, the parameter report shows experts, router and attention apart, a merge equals base plus adapter, full
fine-tuning trains the experts, and Q-LoRA attaches and steps on a 4-bit model whose experts stay unquantized."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from torch import nn

from tuning.model import (
    LoadOptions,
    LoraOptions,
    attach_lora,
    count_parameters,
    load_model,
    lora_targets,
    moe_parts,
    set_trainable,
)

# hidden 32, 2 layers, 4 experts, top-2: built straight from the transformers config classes
SIZES = {
    "vocab_size": 256,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
}
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4, "moe_intermediate_size": 16}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 4, "intermediate_size": 16}),
}
ROUTER = "mlp.gate.weight"
EXPERTS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def tiny_moe(family: str = "qwen3_moe", **overrides) -> nn.Module:
    config_class, model_class, own = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**SIZES, **own, "initializer_range": 0.02, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config)


def one_step(model, steps: int = 1) -> dict[str, torch.Tensor]:
    """The trainable weights before `steps` AdamW steps on random tokens."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return before


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_targets_the_experts_and_leaves_the_router_unless_named(family):
    model = tiny_moe(family)
    assert list(moe_parts(model).routers) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    default = lora_targets(model, None, include_vision=False)
    assert default.parameters == EXPERTS and "q_proj" in default.modules and "gate" not in default.modules
    assert lora_targets(model, ["all-linear", "gate"], False).parameters == [*EXPERTS, ROUTER]
    assert lora_targets(model, ["experts"], False) == lora_targets(model, ["gate_up_proj", "down_proj"], False)
    only_router = lora_targets(model, ["gate", "q_proj"], False)
    assert only_router.parameters == [ROUTER] and "q_proj" in only_router.modules
    with pytest.raises(ValueError, match=r"up_proj.*matches nothing.*expert parameters: down_proj, gate_up_proj"):
        lora_targets(model, ["up_proj"], False)


def test_a_step_trains_the_expert_lora_and_the_report_shows_the_parts_apart(caplog):
    model = tiny_moe()
    plain = count_parameters(model)
    assert plain["experts"] == 2 * (4 * 32 * 32 + 4 * 32 * 16) and plain["router"] == 2 * 4 * 32
    with caplog.at_level(logging.INFO, logger="tuning.model"):
        model = attach_lora(model, LoraOptions(r=4, alpha=8), [], quantized=False, checkpointing=True)
    assert "no dropout there; dropout 0.05 on the linear layers only" in caplog.text
    dropouts = {type(m.lora_dropout["default"]) for m in model.modules() if hasattr(m, "lora_dropout")}
    assert dropouts == {nn.Dropout, nn.Identity}  # attention LoRA keeps its dropout, the experts' has none

    report = count_parameters(model)
    assert report["experts"] > plain["experts"] and report["router"] == plain["router"]
    assert report["experts_trainable"] > 0 and report["attention_trainable"] > 0 and report["router_trainable"] == 0
    assert report["lora"] == report["trainable"] == report["experts_trainable"] + report["attention_trainable"]

    before = one_step(model)
    after = dict(model.named_parameters())
    expert_b = [n for n in before if ".experts." in n and "lora_B" in n]
    assert len(expert_b) == 4  # gate_up_proj and down_proj in both layers
    assert all(not torch.equal(before[n], after[n]) for n in expert_b)
    assert not any(p.requires_grad for n, p in after.items() if "lora_" not in n)


def test_dora_leaves_the_experts_out_by_default_and_refuses_them_by_name():
    model = attach_lora(tiny_moe(), LoraOptions(r=4, use_dora=True), [], quantized=False, checkpointing=False)
    assert not any(".experts." in n for n, _ in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="--use_dora cannot adapt fused expert parameters"):
        attach_lora(tiny_moe(), LoraOptions(r=4, use_dora=True, target_modules=["experts"]), [], False, False)


def test_the_experts_take_a_rank_of_their_own():
    model = attach_lora(tiny_moe(), LoraOptions(r=4, dropout=0.0, expert_r=2), [], False, False)
    weights = {n: p.shape for n, p in model.named_parameters()}
    assert weights["base_model.model.model.layers.0.mlp.experts.lora_A.default.weight"] == (2 * 4, 16)  # 4 experts
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (4, 32)


def test_full_fine_tuning_trains_the_experts_and_the_router():
    model = tiny_moe()
    set_trainable(model, fix_vit=True, tune_projector=True)
    report = count_parameters(model)
    assert report["experts_trainable"] == report["experts"] and report["router_trainable"] == report["router"]
    before = one_step(model)
    after = dict(model.named_parameters())
    moved = [n for n in before if (".experts." in n or ".gate." in n) and not torch.equal(before[n], after[n])]
    assert len(moved) == 6  # gate_up_proj, down_proj and the router's weight, in both layers


def test_merged_expert_lora_equals_base_plus_adapter_and_loads_alone(tmp_path, tiny_text):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tuning.merge import merge

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    tiny_moe(vocab_size=AutoConfig.from_pretrained(tiny_text).vocab_size).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_text).save_pretrained(base)
    model = attach_lora(
        AutoModelForCausalLM.from_pretrained(base), LoraOptions(r=4, alpha=8, dropout=0.0), [], False, False
    )
    with torch.no_grad():  # an adapter that moves the logits: LoRA's B starts at zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    model.save_pretrained(adapter)

    result = merge(adapter, tmp_path / "merged")
    assert result.max_logit_difference is not None and result.max_logit_difference < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - expected).abs().max() < 1e-5
        assert (plain(input_ids=ids).logits - expected).abs().max() > 1e-2  # the experts' adapter did something
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_qlora_attaches_to_the_experts_and_steps_on_a_4bit_model(tmp_path, caplog):
    tiny_moe().save_pretrained(tmp_path / "base")
    model = load_model(LoadOptions(str(tmp_path / "base"), q_lora=True))
    experts = model.model.layers[0].mlp.experts
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert experts.gate_up_proj.dtype == torch.float32  # bitsandbytes quantizes linear layers only
    with caplog.at_level(logging.WARNING, logger="tuning.model"):
        model = attach_lora(model, LoraOptions(r=4, alpha=8), [], quantized=True, checkpointing=True)
    assert "the fused experts stay in float32" in caplog.text
    model.train()  # before any forward: a no-grad forward first would turn the 4-bit weights inference-only
    before = one_step(model, steps=2)
    after = dict(model.named_parameters())
    changed = [n for n in before if ".experts." in n and not torch.equal(before[n], after[n])]
    assert len(changed) == 8  # lora_A and lora_B of gate_up_proj and down_proj, both layers


def test_qlora_keeps_16_bit_experts_in_16_bits(tmp_path):
    """PEFT's k-bit preparation casts every unquantized 16-bit weight to fp32, which would double the experts."""
    tiny_moe().save_pretrained(tmp_path / "base")
    model = load_model(LoadOptions(str(tmp_path / "base"), dtype=torch.bfloat16, q_lora=True))
    model = attach_lora(model, LoraOptions(r=4, alpha=8), [], quantized=True, checkpointing=False)
    layer = model.base_model.model.model.layers[0]
    assert layer.mlp.experts.get_param().dtype == torch.bfloat16
    assert layer.input_layernorm.weight.dtype == torch.float32
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer runs with --bf16
        one_step(model)
