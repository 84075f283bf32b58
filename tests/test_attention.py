"""Per-sample SDPA for packed rows: the same loss and gradients as the stock masked sdpa, no T x T mask, and
everything that is not a packed row (padding, generation) unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from tests.helpers import assert_same_training_step, seed_features
from tuning.attention import PACKED_SDPA, attend_per_sample, attention_layers_only, sample_bounds
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


def test_other_implementations_and_layers_other_than_attention_are_left_alone(tiny_text):
    """Eager keeps its implementation; a sliding window is attention the per-sample calls compute (within the window),
    linear-attention layers are not."""
    eager = AutoModelForCausalLM.from_pretrained(tiny_text, attn_implementation="eager")
    assert not attend_per_sample(eager) and eager.config._attn_implementation == "eager"
    config = AutoConfig.from_pretrained(tiny_text)
    assert attention_layers_only(config)
    settings = {k: v for k, v in json.loads(config.to_json_string()).items() if k != "layer_types"}
    sliding = type(config).from_dict(
        {**settings, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}
    )
    assert set(sliding.layer_types) == {"sliding_attention"} and attention_layers_only(sliding)
    linear = type(config).from_dict({**settings, "layer_types": ["linear_attention", "full_attention"]})
    assert not attention_layers_only(linear)


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


def test_a_sliding_layer_sees_its_window_within_each_sample():
    """A query sees itself and the window - 1 keys before it in its own sample (transformers' sliding masks), for
    samples shorter than the window, as long, one longer and several windows long; grouped key/value heads too."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tuning.attention import packed_sdpa_attention

    window, lengths = 4, [3, 4, 5, 11]
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, sum(lengths), 8, generator=generator)
    k, v = (torch.randn(1, 2, sum(lengths), 8, generator=generator) for _ in range(2))
    positions = torch.tensor([[i for n in lengths for i in range(n)]])
    sample = torch.tensor([s for s, n in enumerate(lengths) for _ in range(n)])
    i, j = positions[0][:, None], positions[0][None, :]
    band = (sample[:, None] == sample[None, :]) & (j <= i) & (j > i - window)
    expected, _ = sdpa_attention_forward(module, q, k, v, band[None, None], scaling=0.5)
    out, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=positions, sliding_window=window, scaling=0.5)
    assert torch.allclose(out, expected, atol=1e-6)


def test_the_mask_is_left_out_only_for_one_causal_row():
    """Several rows, and masks that let a token see the next one (image blocks attending both ways), keep sdpa's own
    mask: the per-sample calls only reproduce causal attention."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    from tuning.attention import packed_sdpa_mask

    row = {"q_length": 6, "kv_length": 6, "allow_is_causal_skip": False}
    assert packed_sdpa_mask(batch_size=1, mask_function=causal_mask_function, **row) is None
    assert packed_sdpa_mask(batch_size=2, mask_function=causal_mask_function, **row).shape == (2, 1, 6, 6)
    assert packed_sdpa_mask(batch_size=1, mask_function=bidirectional_mask_function, **row).all()
