"""The chunked loss from the hidden states equals the stock loss, and token-budget batches change no gradient."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from tests.helpers import encoder_for, seed_features, small_run_args, write_json
from tuning.data.batching import TokenBudgetBatchSampler, pack
from tuning.data.collate import FlatteningCollator, PaddingCollator
from tuning.data.dataset import build_dataset
from tuning.families import packed_positions
from tuning.loss import CHUNK_BYTES, MIN_CHUNK_ROWS, chunk_rows, supervised_loss
from tuning.model import set_use_cache


def loss_and_gradients(model, batch, chunked: bool):
    model.zero_grad()
    labels = batch["labels"]
    if chunked:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with supervised_loss(model, labels, chunk=5) as keep:  # small chunks: many of them
            out = model(**inputs, logits_to_keep=keep)
        assert out.logits.shape == (1, 1)  # the summed loss, never the logits
        loss = out.logits.reshape(()) / (labels[:, 1:] != -100).sum()
    else:
        loss = model(**batch).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, batch):
    set_use_cache(model, False)
    model.train()
    plain, plain_grads = loss_and_gradients(model, batch, chunked=False)
    chunked, chunked_grads = loss_and_gradients(model, batch, chunked=True)
    assert abs(plain - chunked) < 1e-5
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, chunked_grads[name], atol=1e-5, rtol=1e-4), name


def test_a_chunk_of_logits_is_bounded_in_bytes_not_rows():
    qwen = chunk_rows(151_936)
    assert qwen * 151_936 * 4 <= CHUNK_BYTES and qwen >= 128  # 128 rows measured as fast as 256 on this CPU
    assert chunk_rows(6_000) > 3_000  # a small vocabulary: the whole batch at once
    assert chunk_rows(10**8) == MIN_CHUNK_ROWS


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_chunked_loss_and_gradients_equal_the_stock_path_on_text(tiny_text, text_processing, layout):
    model = AutoModelForCausalLM.from_pretrained(tiny_text)
    batch = seed_features(text_processing, ["example_chatml.jsonl", "example_pretrain.jsonl"])
    collate = FlatteningCollator() if layout == "packed" else PaddingCollator(text_processing[0].pad_token_id)
    assert_same(model, collate(batch))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_chunked_loss_and_gradients_equal_the_stock_path_on_vl(tiny_vl, vl_processing, layout):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl)
    batch = seed_features(vl_processing, ["example.json", "example_openai.jsonl", "example_video.json"])
    collate = FlatteningCollator(packed_positions(model)) if layout == "packed" else PaddingCollator(0)
    assert_same(model, collate(batch))


def test_token_budget_batches_hold_every_sample_once_within_the_budget():
    lengths = [5, 900, 40, 41, 300, 1200, 7, 7, 650, 99] * 30
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=1000, seed=3, window=64)
    first = list(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(len(lengths)))
    for batch in first:
        assert sum(lengths[i] for i in batch) <= 1000 or len(batch) == 1
    filled = sum(lengths) / (len(first) * 1000)
    assert filled > 0.85  # best-fit decreasing leaves little room unused
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(map(sorted, second)) == sorted(map(sorted, first)) and len(sampler) == len(first)
    assert sorted(map(sorted, pack([5, 3, 2], 5, random.Random(0), window=8))) == [[0], [1, 2]]  # best fit


@pytest.mark.slow
def test_one_step_of_two_n_tokens_equals_two_accumulated_steps_of_n(tmp_path, tiny_text):
    """Samples of different lengths and supervised counts: the step's gradient is normalised over all its
    supervised tokens, so one batch of both equals two accumulated batches of one each."""
    records = [
        {"messages": [{"role": "user", "content": "Say a long thing."},
                      {"role": "assistant", "content": "one two three four five six seven eight nine ten"}]},
        {"messages": [{"role": "user", "content": "And a short one?"}, {"role": "assistant", "content": "ok"}]},
    ]  # fmt: skip
    data = write_json(tmp_path / "two.json", records)
    lengths = [
        len(s.input_ids)
        for s in build_dataset([str(data)], encoder_for(_text(tiny_text)), show_progress=False)[0].samples
    ]
    common = ["--use_lora", "True", "--max_steps", "1", "--optim", "sgd", "--learning_rate", "0.5",
              "--save_strategy", "no", "--lora_dropout", "0"]  # fmt: skip

    def adapter(out, budget, accumulation):
        flags = ["--max_tokens_per_batch", str(budget), "--gradient_accumulation_steps", str(accumulation), *common]
        from finetune import train

        train(small_run_args(tiny_text, out, [data], *flags))
        return load_file(out / "adapter_model.safetensors")

    together = adapter(tmp_path / "one", sum(lengths), 1)
    apart = adapter(tmp_path / "two", max(lengths), 2)
    assert together.keys() == apart.keys()
    for name, weight in together.items():
        assert torch.allclose(weight, apart[name], atol=1e-6), name
    steps = json.loads((tmp_path / "two" / "trainer_state.json").read_text())["global_step"]
    assert steps == 1


def _text(tiny_text):
    from tuning.data.processing import load_processing

    return load_processing(str(tiny_text))
