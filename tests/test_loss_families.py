"""The chunked loss is the model's own loss in every family: the logit transform its config names (Gemma 2's soft
cap, Cohere's logit_scale, Granite's logits_scaling) applied inside the chunks, an MoE router's load-balancing loss
added as the model adds it, tied, untied and biased heads; where a model changes its logits otherwise, the stock loss
trains, said once in the log. Tiny random models straight from their transformers config classes."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from tuning.loss import LogitTransformMismatch, supervised_loss, unsupported_reason
from tuning.model import set_use_cache
from tuning.trainer import SupervisedTrainer

VOCAB = 256
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "initializer_range": 0.2,  # logits of a few units: a soft cap or a scale changes the loss visibly
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
EXPERTS = {"num_experts_per_tok": 2, "router_aux_loss_coef": 0.1}

# family: (config class, its fields); each changes its logits between the head and the loss, or has a head to cover
TRANSFORMS = {
    "gemma2 soft cap": ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 3.0}),
    "cohere logit_scale": ("CohereConfig", {"logit_scale": 4.0}),
    "granite logits_scaling": ("GraniteConfig", {"logits_scaling": 0.25, "tie_word_embeddings": False}),
    "granite-moe logits_scaling": ("GraniteMoeConfig", {"logits_scaling": 0.5, "num_local_experts": 4, **EXPERTS}),
}
HEADS = {
    "qwen2 tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2 untied": ("Qwen2Config", {"tie_word_embeddings": False}),
    "phi with a bias": ("PhiConfig", {}),
}
MOE = {
    "qwen3-moe": ("Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 16, **EXPERTS}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, **EXPERTS}),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, **EXPERTS}),
    "gpt-oss": ("GptOssConfig", {"num_local_experts": 4, "head_dim": 16, **EXPERTS}),
}


def tiny(config_class: str, fields: dict | None = None, **more):
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SMALL, **(fields or {}), **more})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")  # Gemma 2 refuses sdpa
    set_use_cache(model, False)
    return model.train()


def batch(layout: str) -> dict:
    """padded: two rows, prompts and the second row's padding unsupervised. packed: one row of three samples, each
    starting at position 0 with an unsupervised prompt."""
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if layout == "padded":
        labels[:, :6] = -100
        labels[1, 17:] = -100
        mask = torch.ones_like(ids)
        mask[1, 17:] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ids, labels = ids[:1], labels[:1]
    starts, positions = (0, 9, 15), []
    for start, end in zip(starts, (*starts[1:], 24), strict=True):
        labels[0, start : start + 3] = -100
        positions += range(end - start)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.tensor([positions])}


def trainer_for(model, tmp_path, loss_impl: str = "chunked", **flags) -> SupervisedTrainer:
    from finetune import TrainingArguments  # the run's own arguments, --moe_aux_loss_coef among them

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, dataloader_num_workers=0, **flags
    )
    return SupervisedTrainer(model=model, args=args, loss_impl=loss_impl)


def step(model, loss_of) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = loss_of()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def own_step(model, data: dict, **kwargs):
    """The model's own loss (with labels) and its gradients."""
    return step(model, lambda: model(**data, **kwargs).loss)


def chunked_step(trainer, data: dict, **kwargs):
    return step(trainer.model, lambda: trainer.compute_loss(trainer.model, data, **kwargs))


def assert_same(expected, got) -> None:
    (loss, grads), (other_loss, other_grads) = expected, got
    assert abs(loss.item() - other_loss.item()) < 1e-5, (loss.item(), other_loss.item())
    assert grads.keys() == other_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(other_grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item()), name


def ours(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tuning.trainer"]


def raw_head_loss(model, data: dict) -> float:
    """The loss over the logits as the head returns them: what chunks that ignored the model's transform would give."""
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(**data)
    hook.remove()
    logits, labels = seen[0][:, :-1].float(), data["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1)).item()


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("family", [*TRANSFORMS, *HEADS])
def test_the_chunked_loss_is_the_models_own_through_its_logit_transform(family, layout, tmp_path, caplog):
    config_class, fields = {**TRANSFORMS, **HEADS}[family]
    model, data = tiny(config_class, **fields), batch(layout)
    head = model.get_output_embeddings()
    if family in HEADS:  # the head this case covers
        tied = head.weight is model.get_input_embeddings().weight
        assert (tied, head.bias is not None) == {"qwen2 tied": (True, False), "qwen2 untied": (False, False),
                                                 "phi with a bias": (False, True)}[family]  # fmt: skip
    trainer = trainer_for(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="tuning.trainer"):
        chunked = chunked_step(trainer, data)
    assert trainer.stock_loss_reason is None and not ours(caplog)  # the chunks ran, no fallback
    own = own_step(model, data, **({"output_router_logits": True} if trainer.router_loss_weight else {}))
    assert_same(own, chunked)
    if family in TRANSFORMS:  # the case can fail: the transform moves the loss far beyond the tolerance
        assert abs(raw_head_loss(model, data) - own[0].item()) > 1e-2


def test_the_summed_loss_leaves_the_model_as_the_heads_output(tmp_path):
    """Called directly, the model's logits carry the summed loss itself, not the model's soft cap of that number."""
    model, data = tiny(*TRANSFORMS["gemma2 soft cap"]), batch("padded")
    inputs = {k: v for k, v in data.items() if k != "labels"}
    with supervised_loss(model, data["labels"], chunk=5) as keep:  # small chunks: many of them
        out = model(**inputs, logits_to_keep=keep)
    supervised = (data["labels"][:, 1:] != -100).sum()
    assert out.logits.shape == (1, 1) and out.logits.item() > 3.0  # above the cap: not soft-capped
    assert abs(out.logits.item() / supervised - model(**data).loss.item()) < 1e-5


@pytest.mark.parametrize("family", list(MOE))
def test_an_moe_model_trains_its_router_loss_on_the_chunked_path(family, tmp_path):
    model, data = tiny(*MOE[family]), batch("padded" if family != "olmoe" else "packed")
    trainer = trainer_for(model, tmp_path)
    assert trainer.router_loss_weight == 0.1 and not model.config.output_router_logits  # generate() fails with it
    chunked = chunked_step(trainer, data)
    own = own_step(model, data, output_router_logits=True)  # its own loss with the router's
    assert_same(own, chunked)
    aux = model(**data, output_router_logits=True).aux_loss
    assert 0.1 * aux.item() > 1e-2  # the term the chunks once dropped, far beyond the tolerance
    # normalised over the tokens of an accumulated step, as the stock Trainer normalises the model's own loss
    items = torch.tensor(3 * (data["labels"][:, 1:] != -100).sum().item())
    stock = trainer_for(model, tmp_path, loss_impl="plain")
    assert_same(
        chunked_step(stock, data, num_items_in_batch=items), chunked_step(trainer, data, num_items_in_batch=items)
    )


def test_moe_aux_loss_coef_overrides_the_configs_weight_on_both_paths(tmp_path):
    model, data = tiny(*MOE["qwen3-moe"]), batch("padded")
    trainer = trainer_for(model, tmp_path, moe_aux_loss_coef=0.5)
    assert trainer.router_loss_weight == 0.5 and model.router_aux_loss_coef == 0.5  # the forward's copy too
    assert model.config.router_aux_loss_coef == 0.5
    stock = trainer_for(model, tmp_path, loss_impl="plain", moe_aux_loss_coef=0.5)
    chunked = chunked_step(trainer, data)
    assert_same(chunked_step(stock, data), chunked)
    with torch.no_grad():
        out = model(**data, output_router_logits=True)
    cross_entropy = out.loss - 0.5 * out.aux_loss
    assert abs(chunked[0].item() - (cross_entropy + 0.5 * out.aux_loss).item()) < 1e-5
    assert abs(chunked[0].item() - (cross_entropy + 0.1 * out.aux_loss).item()) > 1e-2  # not the config's 0.1

    off = trainer_for(model, tmp_path, moe_aux_loss_coef=0.0)
    assert off.router_loss_weight is None and model.router_aux_loss_coef == 0
    assert abs(chunked_step(off, data)[0].item() - cross_entropy.item()) < 1e-5


def test_a_transform_the_config_does_not_say_falls_back_to_the_stock_loss_with_a_log_line(tmp_path, caplog):
    """HyperCLOVAX multiplies its logits by the logits_scaling that Granite divides them by: the probes the head
    returns beside the loss show it, and that step and every later one train the model's own loss."""
    model, data = tiny("HyperCLOVAXConfig", logits_scaling=0.25), batch("padded")
    inputs = {k: v for k, v in data.items() if k != "labels"}
    mismatch = pytest.raises(LogitTransformMismatch, match="not as its config says")
    with mismatch, supervised_loss(model, data["labels"]) as keep:
        model(**inputs, logits_to_keep=keep)
    trainer = trainer_for(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="tuning.trainer"):
        first = chunked_step(trainer, data)
        second = chunked_step(trainer, data)
    assert ours(caplog) == [
        f"the stock loss over the full logits trains this model, not the chunked loss: {trainer.stock_loss_reason}"
    ]  # one line, at the first step
    own = own_step(model, data)
    assert_same(own, first)
    assert_same(own, second)


def test_a_loss_term_the_chunks_cannot_give_and_label_smoothing_use_the_stock_loss(tmp_path, caplog):
    model, data = tiny(*HEADS["qwen2 untied"]), batch("padded")
    model.config.z_loss_coefficient = 1e-4  # as Bamba's config adds a z-loss over every position's logits
    assert "z-loss" in unsupported_reason(model)
    with caplog.at_level(logging.WARNING, logger="tuning.trainer"):
        trainer = trainer_for(model, tmp_path)
        assert_same(own_step(model, data), chunked_step(trainer, data))
    assert "z_loss_coefficient" in trainer.stock_loss_reason and len(ours(caplog)) == 1
    model.config.z_loss_coefficient = 0.0
    smoothed = trainer_for(model, tmp_path, label_smoothing_factor=0.1)
    chunked_step(smoothed, data)
    assert "label smoothing" in smoothed.stock_loss_reason
