"""The shell launchers: run with no arguments anywhere, fail early and clearly on bad input."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO, run_env


def launch(script: str, *args: str, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", f"finetune/{script}", *args],
        cwd=REPO,
        env={**run_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_options_and_defaults():
    result = launch("finetune_lora_ds.sh", "-h")
    assert result.returncode == 0
    assert "-m, --model" in result.stdout and "--deepspeed ds_config_zero2.json" in result.stdout


def test_missing_data_and_unknown_model_fail_before_training(tmp_path):
    missing = launch("finetune_lora_single_gpu.sh", "-d", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "data file" in missing.stderr and "not found" in missing.stderr
    unknown = launch("finetune_lora_single_gpu.sh", "-m", "./no/such/model")
    assert unknown.returncode == 2 and "model ./no/such/model not found" in unknown.stderr
    not_a_model = launch("finetune_lora_single_gpu.sh", "-m", str(tmp_path))
    assert not_a_model.returncode == 2 and "without config.json" in not_a_model.stderr


LAUNCHERS = [
    "finetune_lora_ds.sh",
    "finetune_ds.sh",
    "finetune_lora_single_gpu.sh",
    "finetune_qlora_ds.sh",
    "finetune_qlora_single_gpu.sh",
    "finetune.sh",
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("script", LAUNCHERS)
def test_each_launcher_runs_with_no_arguments(tmp_path, tiny_vl, script):
    out = tmp_path / "out"
    result = launch(script, OUTPUT_DIR=str(out))  # the output folder as a variable: no arguments at all
    assert result.returncode == 0, result.stderr[-3000:]
    assert "+ " in result.stderr and "torch.distributed.run" in result.stderr  # the command is printed
    assert "attention: sdpa_packed" in result.stderr  # packed by default: one sdpa call per sample, no mask
    tiled = "MLPs run a tile of" in result.stderr  # the decoder's and the vision tower's MLPs
    assert tiled != (script == "finetune_ds.sh"), "tiled MLPs everywhere but under ZeRO-3 (finetune_ds.sh)"
    assert (out / "processor_config.json").is_file() and (out / "loss.png").is_file()
    from transformers import AutoModelForImageTextToText

    if (out / "adapter_config.json").is_file():
        from peft import PeftModel

        PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_vl), out)
        assert "lora" in script
    else:
        AutoModelForImageTextToText.from_pretrained(out)
        assert "lora" not in script


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_with_two_ranks_on_a_vl_model_and_picture_less_batches(tmp_path, tiny_vl):
    out = tmp_path / "zero2"
    result = launch("finetune_lora_ds.sh", "-o", str(out), "--num_train_epochs", "1", GPUS_PER_NODE="2")
    assert result.returncode == 0, result.stderr[-3000:]  # identity_0 has no picture: one rank's batch is text only
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_gpus_per_node_starts_that_many_processes(tmp_path, tiny_vl):
    out = tmp_path / "two"
    result = launch("finetune.sh", "-o", str(out), "--num_train_epochs", "1", "--use_lora", "True", GPUS_PER_NODE="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--nproc_per_node 2" in result.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    # 3 samples, batch 1 per process, 8 accumulation steps: one optimizer step with two ranks sharing the data
    assert state["global_step"] == 1 and (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_qlora_launcher_on_a_gptq_checkpoint(tmp_path, tiny_gptq):
    out = tmp_path / "gptq"
    data = str(REPO / "data" / "example_chatml.jsonl")
    result = launch(
        "finetune_qlora_single_gpu.sh", "-m", str(tiny_gptq), "-d", data, "-o", str(out), "--max_steps", "2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # on this CPU no precision flag (fp32); on a GPU the launcher passes --fp16 True for a GPTQ checkpoint
    assert "--bf16" not in result.stderr.split("+ ", 1)[1].splitlines()[0]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_gptq)
