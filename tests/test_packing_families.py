"""Packing is exact for every text family, or it does not happen.

Each family is a tiny random model built from its transformers config class (hidden 32, 2 layers, vocabulary 256,
a sliding window of 8 where the family has one, so that samples of 9 to 20 tokens cross it). A row of four samples
packed as FlatteningCollator packs them, attention switched as the toolkit switches it, must give every sample the
logits it gets alone, and the loss and gradients of the row must be the sum of the samples'. Families whose layers
carry state from one sample into the next (linear attention, Mamba, convolutions, RWKV) must train unpacked, and the
toolkit must say why.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from tuning.attention import attend_per_sample, packed_sdpa_attention, supported_attention
from tuning.data.collate import FlatteningCollator
from tuning.families import family_of
from tuning.model import set_use_cache

LENGTHS = (20, 8, 13, 9)  # the window (8) exactly, one past it, and more than two windows
WINDOW = 8
SMALL = {
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SLIDING = {"sliding_window": WINDOW}
ALTERNATING = {**SLIDING, "layer_types": ["sliding_attention", "full_attention"]}
MOE = {"num_experts_per_tok": 2}

# family -> (config class, settings beyond SMALL)
EXACT = {
    "llama-3": ("LlamaConfig", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", SLIDING),
    "mixtral": ("MixtralConfig", {**SLIDING, **MOE, "num_local_experts": 4}),
    "phi-3": ("Phi3Config", SLIDING),
    "gemma-2": ("Gemma2Config", {**ALTERNATING, "head_dim": 8, "query_pre_attn_scalar": 8}),
    "gemma-3": ("Gemma3TextConfig", {**ALTERNATING, "head_dim": 8}),
    "qwen3-moe": ("Qwen3MoeConfig", {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 8}),
    "qwen3-moe-sliding": (
        "Qwen3MoeConfig",
        {**MOE, **SLIDING, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 8, "use_sliding_window": True},
    ),
    "cohere-2": ("Cohere2Config", ALTERNATING),
    "granite": ("GraniteConfig", {}),
    "glm-4": ("Glm4Config", {"head_dim": 8}),
    "deepseek-v3": (
        "DeepseekV3Config",
        {**MOE, "num_key_value_heads": 4, "n_routed_experts": 4, "moe_intermediate_size": 32, "n_group": 1,
         "topk_group": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
         "qk_nope_head_dim": 8, "v_head_dim": 8},
    ),
    "starcoder-2": ("Starcoder2Config", SLIDING),
    # masks built without position_ids: stock sdpa and eager leak, the per-sample attention reads the positions
    "opt": ("OPTConfig", {"ffn_dim": 64, "word_embed_proj_dim": 32, "dropout": 0.0}),
    "afmoe": (
        "AfmoeConfig",
        {**MOE, **SLIDING, "head_dim": 8, "moe_intermediate_size": 32, "num_experts": 4, "num_shared_experts": 1,
         "global_attn_every_n_layers": 2},
    ),
}  # fmt: skip


def build(config_class: str, settings: dict, attn: str | None = "sdpa"):
    """A tiny random model of the family loaded as the toolkit loads it: the attention supported_attention gives."""
    config = getattr(transformers, config_class)(**{**SMALL, **settings})
    attn, _ = supported_attention(config, attn)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    set_use_cache(model, False)
    return model.train()


def samples() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    features = []
    for length in LENGTHS:
        ids = torch.randint(3, 256, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})  # a prompt, then the answer
    return features


def loss_and_gradients(model, batch: dict, items: int):
    """The summed loss over `items` supervised tokens (as the Trainer normalises a step), and every gradient."""
    model.zero_grad()
    output = model(**batch, num_items_in_batch=items)
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return output.logits.detach()[0], output.loss.item(), grads


def assert_packed_equals_alone(reference, packed):
    """`packed` (attention as the toolkit switches it) on one packed row against `reference` (the same weights,
    stock attention) on every sample alone."""
    features = samples()
    batch = FlatteningCollator()(features)
    items = int((batch["labels"][:, 1:] != -100).sum())
    alone_logits, alone_loss, alone_grads = [], 0.0, {}
    for f in features:
        labels = torch.tensor([[-100, *f["labels"][1:]]])  # the first label is -100 in a packed row too
        alone = {"input_ids": torch.tensor([f["input_ids"]]), "labels": labels}
        logits, loss, grads = loss_and_gradients(reference, alone, items)
        alone_logits.append(logits)
        alone_loss += loss
        for name, grad in grads.items():
            alone_grads[name] = alone_grads.get(name, 0) + grad
    logits, loss, grads = loss_and_gradients(packed, batch, items)
    assert (logits - torch.cat(alone_logits)).abs().max().item() < 1e-5
    assert abs(loss - alone_loss) <= 1e-5 * abs(alone_loss)
    assert grads.keys() == alone_grads.keys()
    for name, grad in grads.items():  # a floor for gradients that are zero but for rounding (a key's bias)
        assert (grad - alone_grads[name]).norm() <= 1e-5 * alone_grads[name].norm() + 1e-8, name


@pytest.mark.parametrize("family", list(EXACT))
def test_each_packed_sample_is_computed_as_if_alone(family):
    config_class, settings = EXACT[family]
    reference = build(config_class, settings)
    packed = copy.deepcopy(reference)
    switched = attend_per_sample(packed)
    assert switched == (reference.config._attn_implementation == "sdpa")
    assert family_of(reference.config).packs_exactly
    assert_packed_equals_alone(reference, packed)


def test_a_sliding_model_generates_and_pads_as_before():
    """Rows longer than the window outside training (several rows, left padding, generation with a cache) keep the
    stock path, window included; a single row goes per sample (the same up to rounding)."""
    stock = build(*EXACT["mistral"]).eval()
    packed = copy.deepcopy(stock)
    assert attend_per_sample(packed)
    ids = torch.randint(3, 256, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    settings = {"max_new_tokens": WINDOW, "do_sample": False, "pad_token_id": 0}
    for inputs in ({"input_ids": ids[:1]}, {"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
        with torch.no_grad():
            assert torch.allclose(stock(**inputs).logits, packed(**inputs).logits, atol=1e-6)
        assert torch.equal(stock.generate(**inputs, **settings), packed.generate(**inputs, **settings))


def test_gemma_2_has_no_sdpa_and_packs_exactly_with_eager(tmp_path):
    """Gemma 2 soft-caps its attention scores, which sdpa cannot: asked for sdpa, the toolkit loads it with eager and
    says so; eager masks keep its packed samples apart, sliding layers included."""
    config = transformers.Gemma2Config(**{**SMALL, **EXACT["gemma-2"][1]})
    with pytest.raises(ValueError, match="does not support an attention implementation through"):
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    attn, why = supported_attention(config, "sdpa")
    assert attn in ("eager", "flash_attention_2") and "Gemma2ForCausalLM has no sdpa attention" in why
    config.save_pretrained(tmp_path)
    assert supported_attention(str(tmp_path), "sdpa") == (attn, why)  # read from the folder, no weights
    assert supported_attention(config, "eager") == ("eager", None)
    assert supported_attention(transformers.LlamaConfig(**SMALL), "sdpa") == ("sdpa", None)
    model = build(*EXACT["gemma-2"], attn="eager")
    assert not attend_per_sample(model) and model.config._attn_implementation == "eager"


def test_gpt_oss_trains_unpacked():
    """gpt-oss has no sdpa (its attention sinks), and its eager masks are built without the positions, so a packed
    row leaks from one sample into the next: packing must be off (with flash attention's varlen path it would be
    exact, on a GPU). The per-sample attention refuses sinks rather than drop them."""
    settings = {**ALTERNATING, **MOE, "head_dim": 8, "num_local_experts": 4}
    reference = build("GptOssConfig", settings)
    assert reference.config._attn_implementation == "eager"
    assert supported_attention(reference.config, "sdpa")[1].endswith(
        f"GptOssForCausalLM has no sdpa attention in transformers {transformers.__version__}"
    )
    features = samples()
    with torch.no_grad():
        alone = torch.cat([reference(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in features])
        packed = reference(**FlatteningCollator()(features)).logits[0]
    assert (packed - alone).abs().max() > 1e-3  # the leak that packing would train on
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(RuntimeError, match="attention sinks"):
        packed_sdpa_attention(torch.nn.Module(), q, q, q, None, s_aux=torch.zeros(4))
    family = family_of(reference.config)
    assert not family.packs_exactly and family.why_not_packed


# family -> (config class, settings): layers that carry a state from token to token
RECURRENT = {
    "qwen3-next": ("Qwen3NextConfig", {}),
    "qwen3.5": ("Qwen3_5TextConfig", {}),
    "qwen3.5-moe": ("Qwen3_5MoeTextConfig", {}),
    "falcon-h1": ("FalconH1Config", {}),
    "lfm2": ("Lfm2Config", {"num_hidden_layers": 4, "full_attn_idxs": [1, 3]}),
    "lfm2-moe": ("Lfm2MoeConfig", {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2}),
    "bamba": ("BambaConfig", {}),
    "jamba": ("JambaConfig", {}),
    "nemotron-h": ("NemotronHConfig", {}),
    "granite-4-hybrid": ("GraniteMoeHybridConfig", {}),
    "minimax": ("MiniMaxConfig", {}),
    "mamba": ("MambaConfig", {}),
    "mamba-2": ("Mamba2Config", {}),
    "falcon-mamba": ("FalconMambaConfig", {}),
    "rwkv": ("RwkvConfig", {}),
    "recurrent-gemma": ("RecurrentGemmaConfig", {}),
    "xlstm": ("xLSTMConfig", {}),
    "zamba-2": ("Zamba2Config", {}),
    "kimi-linear": ("KimiLinearConfig", {}),
}


@pytest.mark.parametrize("family", list(RECURRENT))
def test_a_family_that_carries_state_across_samples_trains_unpacked(family):
    config_class, settings = RECURRENT[family]
    config = getattr(transformers, config_class)(**settings)
    record = family_of(config)
    assert not record.packs_exactly, f"{record.name} would pack its recurrent state across samples"
    assert "packed sample" in record.why_not_packed
    assert not {"mlp", "moe"} & set(record.why_not_packed.replace(",", " ").split())  # per-token layers carry nothing


def test_qwen3_5_leaks_across_packed_samples_on_the_pytorch_kernels():
    """Why the recurrent families train unpacked: on a CPU (no flash-linear-attention) the Gated DeltaNet layers run
    through the whole row, so every sample after the first sees the ones before it; transformers refuses the
    per-sample resets (cu_seq_lens) on those kernels rather than ignore them."""
    config = transformers.Qwen3_5TextConfig(
        **{**SMALL, "head_dim": 8, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
           "linear_num_value_heads": 4, "layer_types": ["linear_attention", "full_attention"]}
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    set_use_cache(model, False)
    features = samples()
    batch = FlatteningCollator()(features)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in features])
        packed = model(**batch).logits[0]
        starts = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
        with pytest.raises(ValueError, match="can't keep packed sequences apart"):
            model(**batch, cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=20, max_length_k=20)
    first = LENGTHS[0]
    assert (packed[:first] - alone[:first]).abs().max() < 1e-5
    assert (packed[first:] - alone[first:]).abs().max() > 1e-3
    assert not family_of(config).packs_exactly
