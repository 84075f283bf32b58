"""Two processes on the CPU (gloo): DDP, DeepSpeed ZeRO-2/3 and FSDP finish and save loadable results,
and two processes give the loss curve of one process with the same global batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import DATA
from tests.helpers import small_run_args, torchrun_finetune, trainer_state

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
DATA_FILES = [DATA / "example_chatml.jsonl", DATA / "example_pretrain.jsonl"]


def torchrun(processes: int, out, model, *flags) -> dict:
    args = small_run_args(model, out, DATA_FILES, "--save_strategy", "no", *flags)
    torchrun_finetune(processes, args)
    return trainer_state(out)


def losses(state: dict) -> list[float]:
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def assert_loadable(out, tiny_text, lora: bool) -> None:
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_text), out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


LORA = ["--use_lora", "True", "--lora_r", "4"]
TILED = ["--tiled_mlp", "True", "--mlp_tile_tokens", "8"]  # the tiny samples are shorter than the default tile
ENGINES = [
    ("ddp-lora", [*LORA, *TILED]),
    ("zero2-lora", [*LORA, *TILED, "--deepspeed", "ds_config_zero2.json"]),
    ("zero3-full", ["--deepspeed", "ds_config_zero3.json"]),
    ("zero3-lora", [*LORA, "--deepspeed", "ds_config_zero3.json"]),
    # the Qwen scripts call this combination impossible: bnb_4bit_quant_storage in the model's dtype makes it work
    ("zero3-qlora", [*LORA, "--q_lora", "True", "--deepspeed", "ds_config_zero3.json"]),
    (
        "fsdp-full",
        [
            *TILED,
            "--fsdp",
            "full_shard auto_wrap",
            "--fsdp_config",
            '{"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}',
        ],
    ),
]


@pytest.mark.parametrize(("name", "flags"), ENGINES, ids=[e[0] for e in ENGINES])
def test_two_processes_train_and_save_a_loadable_result(tmp_path, tiny_text, name, flags):
    state = torchrun(2, tmp_path / name, tiny_text, "--max_steps", "3", *flags)
    assert len(losses(state)) == 3
    assert_loadable(tmp_path / name, tiny_text, lora="--use_lora" in flags)


# No dropout: its masks come from each rank's own random stream, so they differ between the two layouts.
EXACT_LORA = [*LORA, "--lora_dropout", "0"]
PARITY = [("ddp", EXACT_LORA), ("zero2", [*EXACT_LORA, "--deepspeed", "ds_config_zero2.json"])]


@pytest.mark.parametrize(("name", "flags"), PARITY, ids=[p[0] for p in PARITY])
def test_two_processes_match_one_with_doubled_accumulation(tmp_path, tiny_text, name, flags):
    """The two ranks also tile their MLPs and the one process does not: the engine sees the tiles' gradients."""
    two = losses(torchrun(2, tmp_path / "two", tiny_text, "--max_steps", "4", *TILED, *flags))
    one = losses(
        torchrun(
            1,
            tmp_path / "one",
            tiny_text,
            "--max_steps",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--tiled_mlp",
            "False",
            *flags,
        )
    )
    assert two == pytest.approx(one, abs=1e-4)


PREFERENCE_DATA = [
    DATA.parent / "tests" / "fixtures" / "preference" / name for name in ("trl_conversational.jsonl", "swift_dpo.jsonl")
]


DPO_PARITY = [*PARITY, ("zero3", [*EXACT_LORA, "--deepspeed", "ds_config_zero3.json"])]


@pytest.mark.parametrize(("name", "flags"), DPO_PARITY, ids=[p[0] for p in DPO_PARITY])
def test_dpo_on_two_processes_matches_one_with_doubled_accumulation(tmp_path, tiny_text, name, flags):
    """DPO's loss and its metrics (means over pairs, gathered over the ranks) are a one-rank run's, LoRA's reference
    being the model with its adapter off on each rank (under ZeRO-3 through the same engine, its weights gathered)."""

    def run(processes: int, out, *more: str) -> list[dict]:
        args = small_run_args(tiny_text, out, PREFERENCE_DATA, "--stage", "dpo", "--save_strategy", "no", *flags, *more)
        torchrun_finetune(processes, [*args, "--max_steps", "4", "--learning_rate", "1e-2"])
        return [e for e in trainer_state(out)["log_history"] if "loss" in e]

    two = run(2, tmp_path / "two")
    one = run(1, tmp_path / "one", "--gradient_accumulation_steps", "2")
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert [e[key] for e in two] == pytest.approx([e[key] for e in one], abs=1e-4), key
    assert one[-1]["rewards/margins"] != 0
