"""The tiny builds of the text families (tuning/tiny/text.py): each is its family's real architecture, loads with the
Auto classes like a hub checkpoint, trains (a finite loss), generates, and renders its real chat template with the
family's special tokens as single ids; its generation stops are the real generation_config's eos list."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuning.tiny import KINDS, TinySpec, build, ensure_tiny, text

# kind -> (class, bos, eos, pad, generation stops with the end of a turn first, chat template asset)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "<|begin_of_text|>", "<|eot_id|>", None,
              ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"), "llama-3.2"),
    "gemma2": ("Gemma2ForCausalLM", "<bos>", "<eos>", "<pad>", ("<end_of_turn>", "<eos>"), "gemma-2"),
    "gemma3-text": ("Gemma3ForCausalLM", "<bos>", "<eos>", "<pad>", ("<end_of_turn>", "<eos>"), "gemma-3"),
    "mistral": ("MistralForCausalLM", "<s>", "</s>", None, ("</s>",), "mistral-7b-v0.3"),
    "mixtral": ("MixtralForCausalLM", "<s>", "</s>", None, ("</s>",), "mixtral"),
    "phi3": ("Phi3ForCausalLM", "<s>", "<|endoftext|>", "<|endoftext|>",
             ("<|end|>", "<|assistant|>", "<|endoftext|>"), "phi-3.5"),
    "qwen3-moe": ("Qwen3MoeForCausalLM", None, "<|im_end|>", "<|endoftext|>", ("<|im_end|>", "<|endoftext|>"), None),
    "qwen3-next": ("Qwen3NextForCausalLM", None, "<|im_end|>", "<|endoftext|>", ("<|im_end|>", "<|endoftext|>"),
                   "qwen3-next"),
    "gpt-oss": ("GptOssForCausalLM", "<|startoftext|>", "<|return|>", "<|endoftext|>",
                ("<|return|>", "<|call|>", "<|endoftext|>"), "gpt-oss"),
    "deepseek-v3": ("DeepseekV3ForCausalLM", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                    "<｜end▁of▁sentence｜>", ("<｜end▁of▁sentence｜>",), "deepseek-v3.1"),
    "granite": ("GraniteForCausalLM", "<|end_of_text|>", "<|end_of_text|>", "<|end_of_text|>", ("<|end_of_text|>",),
                "granite-3.3"),
    "command-r": ("Cohere2ForCausalLM", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<PAD>", ("<|END_OF_TURN_TOKEN|>",),
                  "command-r7b"),
    "glm4": ("Glm4ForCausalLM", None, "<|endoftext|>", "<|endoftext|>",
             ("<|user|>", "<|observation|>", "<|endoftext|>"), "glm-4-0414"),
}  # fmt: skip
NO_SDPA = {"gemma2", "gpt-oss"}  # their classes refuse sdpa (soft-capping, attention sinks): eager
SLIDING = {"gemma2", "gemma3-text", "mistral", "gpt-oss", "command-r"}

CHAT = [
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue, mostly."},
    {"role": "user", "content": "And at night?"},
    {"role": "assistant", "content": "Black, with stars."},
]


@functools.cache
def _loaded(kind: str):
    folder = ensure_tiny(kind)
    return folder, AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)


def test_every_text_kind_is_registered_under_its_folder():
    registered = {name for name, k in KINDS.items() if k.make.__module__ == text.__name__}
    assert registered == set(FAMILIES)
    for name, (model_class, *_rest) in FAMILIES.items():
        assert KINDS[name].model_class == model_class and KINDS[name].folder == f"tiny-{name}"


@pytest.mark.parametrize("kind", FAMILIES)
def test_loads_trains_and_generates(kind):
    _, tokenizer, model = _loaded(kind)
    model_class, bos, eos, pad, stops, _ = FAMILIES[kind]
    assert type(model).__name__ == model_class
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (bos, eos, pad)
    assert tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id) == list(stops)
    assert type(model)._supports_sdpa == (kind not in NO_SDPA)
    assert model.config._attn_implementation == ("eager" if kind in NO_SDPA else "sdpa")

    ids = tokenizer.apply_chat_template(CHAT, return_dict=True, return_tensors="pt")["input_ids"][:, :48]
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad()
    model.eval()
    assert math.isfinite(loss.item())
    out = model.generate(ids[:, :12], attention_mask=torch.ones_like(ids[:, :12]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 12


@pytest.mark.parametrize("kind", FAMILIES)
def test_real_template_renders_a_two_turn_chat_with_single_id_special_tokens(kind):
    _, tokenizer, _ = _loaded(kind)
    asset = FAMILIES[kind][5]
    expected = text.template(asset) if asset else KINDS[kind].template
    assert tokenizer.chat_template == expected
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    ids = tokenizer.apply_chat_template(CHAT, return_dict=True)["input_ids"]
    assert "Black, with stars." in rendered and "What colour is the sky?" in rendered
    added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()}
    present = {token: i for token, i in added.items() if token in rendered}
    assert FAMILIES[kind][4][0] in present  # the turn end (GLM-4: the next role) is written by the template
    for token, i in present.items():
        assert ids.count(i) == rendered.count(token), token
    assert tokenizer.decode(ids) == rendered
    # The generation prompt renders too (Mistral v0.3's template has none: the prompt ends with [/INST]).
    prompt = tokenizer.apply_chat_template(CHAT[:3], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(rendered[:20])


@pytest.mark.parametrize("kind", sorted(SLIDING))
def test_sliding_windows_are_small_enough_for_tests_to_cross(kind):
    config = _loaded(kind)[2].config
    assert config.sliding_window == text.SLIDING_WINDOW
    if kind != "mistral":
        assert {"sliding_attention", "full_attention"} <= set(config.layer_types)


def test_family_settings_as_the_real_configs():
    gemma2, granite, cohere = (_loaded(k)[2].config for k in ("gemma2", "granite", "command-r"))
    assert (gemma2.final_logit_softcapping, gemma2.attn_logit_softcapping) == (30.0, 50.0)
    assert (granite.embedding_multiplier, granite.logits_scaling, granite.residual_multiplier) == (12.0, 8.0, 0.22)
    assert cohere.logit_scale == 0.25
    qwen_moe, qwen_next = _loaded("qwen3-moe")[2].config, _loaded("qwen3-next")[2].config
    assert (qwen_moe.router_aux_loss_coef, qwen_moe.output_router_logits) == (0.001, False)
    assert {"linear_attention", "full_attention"} <= set(qwen_next.layer_types)


def test_build_is_byte_identical(tmp_path):
    # One representative kind: experts, router and MLA all draw from the seeded generator.
    first = build(TinySpec(kind="deepseek-v3"), tmp_path / "a")
    second = build(TinySpec(kind="deepseek-v3"), tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
