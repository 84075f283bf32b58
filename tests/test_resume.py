"""Resuming reproduces the uninterrupted run; DeepSpeed honours the scheduler; ZeRO-3 saves whole adapters."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from finetune import train
from tests.conftest import DATA
from tests.helpers import small_run_args, torchrun_finetune, trainer_state
from tuning.checkpoints import checkpoint_problems

pytestmark = pytest.mark.slow
DATA_FILES = [DATA / "example.json", DATA / "example_openai.jsonl"]  # 5 samples


def finetune(out, model, *flags, deepspeed: str | None = None) -> dict:
    args = small_run_args(model, out, DATA_FILES, *flags)
    if deepspeed is None:
        train(args)
    else:
        torchrun_finetune(1, [*args, "--deepspeed", deepspeed], timeout=600)
    return trainer_state(out)


def losses(state: dict) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


RESUME_CASES = [
    ("lora", ["--use_lora", "True", "--lora_r", "4"], None),
    ("full", [], None),
    ("lora-zero2", ["--use_lora", "True", "--lora_r", "4"], "ds_config_zero2.json"),
    ("full-zero2", [], "ds_config_zero2.json"),
]


@pytest.mark.parametrize(("name", "flags", "deepspeed"), RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path, tiny_vl, name, flags, deepspeed):
    if deepspeed:
        pytest.importorskip("deepspeed")
    cache = ["--dataset_cache_dir", str(tmp_path / "cache")]  # the whole run encodes, the resumed one reads the cache
    common = [*flags, *cache, "--max_steps", "7", "--save_steps", "4", "--lr_scheduler_type", "cosine"]
    whole = losses(finetune(tmp_path / "whole", tiny_vl, *common, deepspeed=deepspeed))
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    assert checkpoint_problems(checkpoint) == []  # what `auto` checks holds for every layout: plain, DeepSpeed
    resumed = losses(
        finetune(
            tmp_path / "resumed", tiny_vl, *common, "--resume_from_checkpoint", str(checkpoint), deepspeed=deepspeed
        )
    )
    reports = [json.loads((tmp_path / run / "data_report.json").read_text()) for run in ("whole", "resumed")]
    assert [r["from_cache"] for r in reports] == [False, True] and reports[0]["cache"] == reports[1]["cache"]
    assert sorted(resumed) == sorted(whole) == list(range(1, 8))  # 1-4 come from the checkpoint's state
    for step in (5, 6, 7):  # trained again after the resume, from mid-epoch (5 samples per epoch)
        assert abs(resumed[step] - whole[step]) < 1e-5, (step, resumed[step], whole[step])


@pytest.mark.distributed
def test_deepspeed_follows_the_cosine_schedule(tmp_path, tiny_vl):
    flags = [
        "--use_lora",
        "True",
        "--lora_r",
        "4",
        "--max_steps",
        "10",
        "--warmup_steps",
        "2",
        "--lr_scheduler_type",
        "cosine",
        "--save_strategy",
        "no",
    ]
    state = finetune(tmp_path / "ds", tiny_vl, *flags, deepspeed="ds_config_zero2.json")
    rates = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    # transformers' cosine with 2 warmup steps, as the Trainer logs it (the rate used for each step)
    expected = [1e-3 * s / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(10)]
    assert rates == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.distributed
def test_zero3_lora_saves_a_complete_adapter(tmp_path, tiny_vl):
    out = tmp_path / "z3"
    finetune(
        out,
        tiny_vl,
        "--use_lora",
        "True",
        "--lora_r",
        "4",
        "--max_steps",
        "3",
        "--save_strategy",
        "no",
        "--learning_rate",
        "1e-2",
        deepspeed="ds_config_zero3.json",
    )
    tensors = load_file(out / "adapter_model.safetensors")
    lora = {k: v for k, v in tensors.items() if "lora_" in k}
    assert lora and all(v.numel() > 0 for v in tensors.values())
    assert all(v.shape[0] == 4 for k, v in lora.items() if "lora_A" in k)
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # trained away from the zero init
    assert any("merger" in k and v.numel() > 0 for k, v in tensors.items())  # the projector copy is whole too
