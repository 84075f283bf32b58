"""Per-sample SDPA for packed rows: the same loss and gradients as the stock masked sdpa, no T x T mask, and
everything that is not a packed row (padding, generation) unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from tests.helpers import assert_same_training_step, seed_features
from tuning.attention import PACKED_SDPA, attend_per_sample, full_attention_only, sample_bounds
from tuning.data.collate import FlatteningCollator, PaddingCollator
from tuning.families import packed_positions
from tuning.model import set_use_cache


def assert_per_sample_matches_the_masked_sdpa(load, batch):
    packed = load()
    assert attend_per_sample(packed)
    assert_same_training_step(load(), packed, batch)


class SdpaCalls:
    """Every call of torch's SDPA: its sequence length and whether it was given a mask."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, **kwargs):
            self.calls.append((query.shape[-2], attn_mask is not None))
            return real(query, key, value, attn_mask=attn_mask, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


def test_sample_bounds_split_where_positions_restart():
    assert sample_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [0, 3, 5, 6]
    assert sample_bounds(torch.tensor([[5, 6, 7]])) == [0, 3]


def test_packed_text_training_step_equals_the_masked_sdpa(tiny_text, text_processing):
    batch = FlatteningCollator()(seed_features(text_processing, ["example_chatml.jsonl", "example_pretrain.jsonl"]))
    assert len(sample_bounds(batch["position_ids"])) > 3
    assert_per_sample_matches_the_masked_sdpa(
        lambda: AutoModelForCausalLM.from_pretrained(tiny_text, attn_implementation="sdpa"), batch
    )


def test_packed_vl_training_step_equals_the_masked_sdpa(tiny_vl, vl_processing):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl, attn_implementation="sdpa")
    batch = FlatteningCollator(packed_positions(model))(
        seed_features(vl_processing, ["example.json", "example_openai.jsonl", "example_video.json"])
    )
    assert_per_sample_matches_the_masked_sdpa(
        lambda: AutoModelForImageTextToText.from_pretrained(tiny_vl, attn_implementation="sdpa"), batch
    )


def test_a_packed_row_gets_one_unmasked_causal_call_per_sample(tiny_text, text_processing, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_text, attn_implementation="sdpa")
    set_use_cache(model, False)
    batch = FlatteningCollator()(seed_features(text_processing, ["example_chatml.jsonl"]))
    samples = len(sample_bounds(batch["position_ids"])) - 1
    spy = SdpaCalls(monkeypatch)
    with torch.no_grad():
        model(**batch)
    assert spy.calls == [(batch["input_ids"].shape[1], True)] * model.config.num_hidden_layers  # stock: the mask
    spy.calls.clear()
    attend_per_sample(model)
    with torch.no_grad():
        model(**batch)
    assert len(spy.calls) == samples * model.config.num_hidden_layers
    assert not any(masked for _, masked in spy.calls)
    assert max(length for length, _ in spy.calls) < batch["input_ids"].shape[1]


def test_positions_are_read_once_per_forward_and_its_recompute(tiny_text, text_processing, monkeypatch):
    """Reading the positions back waits for a GPU: once per training step, not once per layer and again in the
    checkpoint's recompute; a new row of positions, or the same one changed in place, is read again."""
    import tuning.attention

    model = AutoModelForCausalLM.from_pretrained(tiny_text, attn_implementation="sdpa")
    set_use_cache(model, False)
    attend_per_sample(model)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    assert model.config.num_hidden_layers > 1
    batch = FlatteningCollator()(seed_features(text_processing, ["example_chatml.jsonl"]))
    reads = []

    def counted(positions):
        reads.append(positions)
        return sample_bounds(positions)

    monkeypatch.setattr(tuning.attention, "sample_bounds", counted)
    model(**batch).loss.backward()
    assert len(reads) == 1
    batch = {**batch, "position_ids": batch["position_ids"].clone()}
    model(**batch)
    assert len(reads) == 2
    batch["position_ids"][0, 1:] = torch.arange(1, batch["position_ids"].shape[1])  # one sample now
    spy = SdpaCalls(monkeypatch)
    model(**batch)
    assert len(reads) == 3
    assert spy.calls == [(batch["input_ids"].shape[1], False)] * model.config.num_hidden_layers


def test_padded_batches_and_generation_are_unchanged(tiny_text, text_processing, monkeypatch):
    tokenizer = text_processing[0]
    stock = AutoModelForCausalLM.from_pretrained(tiny_text, attn_implementation="sdpa").eval()
    packed = AutoModelForCausalLM.from_pretrained(tiny_text, attn_implementation="sdpa").eval()
    attend_per_sample(packed)
    padded = PaddingCollator(tokenizer.pad_token_id)(seed_features(text_processing, ["example_chatml.jsonl"]))
    with torch.no_grad():
        assert torch.equal(stock(**padded).logits, packed(**padded).logits)
    tokenizer.padding_side = "left"
    prompts = tokenizer(["Hello there, how", "Tell me a story about a cat who"], return_tensors="pt", padding=True)
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    for inputs in (prompts, {"input_ids": prompts["input_ids"][1:]}):  # with and without an attention mask
        assert torch.equal(stock.generate(**inputs, **settings), packed.generate(**inputs, **settings))


def test_the_saved_config_keeps_a_loadable_attention(tiny_text, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_text, attn_implementation="sdpa")
    attend_per_sample(model)
    assert model.config._attn_implementation == PACKED_SDPA
    model.save_pretrained(tmp_path)
    assert PACKED_SDPA not in (tmp_path / "config.json").read_text()


def test_other_implementations_and_sliding_windows_are_left_alone(tiny_text):
    eager = AutoModelForCausalLM.from_pretrained(tiny_text, attn_implementation="eager")
    assert not attend_per_sample(eager) and eager.config._attn_implementation == "eager"
    config = AutoConfig.from_pretrained(tiny_text)
    assert full_attention_only(config)
    sliding = json.loads(config.to_json_string())
    config = type(config).from_dict(
        {**sliding, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}
    )
    assert not full_attention_only(config)


def test_a_causal_row_without_positions_is_refused():
    from tuning.attention import packed_sdpa_attention

    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(RuntimeError, match="position_ids"):
        packed_sdpa_attention(module, q, q, q, None)
    out, _ = packed_sdpa_attention(module, q, q, q, None, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    first = torch.nn.functional.scaled_dot_product_attention(q[:, :, :3], q[:, :, :3], q[:, :, :3], is_causal=True)
    assert torch.allclose(out[:, :3], first.transpose(1, 2))
