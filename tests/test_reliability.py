"""Interruptions, damaged checkpoints, numerical faults and bad input: each is loud, and nothing saved is lost."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import subprocess

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from finetune import train
from tests.conftest import DATA, PYTHON, REPO, run_env
from tests.helpers import free_port, picture, qwen_vl, small_run_args, trainer_state, write_json
from tuning.checkpoints import checkpoint_problems, resolve_resume

pytestmark = pytest.mark.slow


def lora_args(model, out, *flags) -> list[str]:
    lora = ["--use_lora", "True", "--lora_r", "4", "--lr_scheduler_type", "cosine"]
    return small_run_args(model, out, [DATA / "example.json", DATA / "example_openai.jsonl"], *lora, *flags)


def losses(out) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer_state(out)["log_history"] if "loss" in e}


def start_and_signal(command: list[str], after_losses: int, ctrl_c: bool = False) -> tuple[int, str]:
    """Run a training command, signal it once it has logged `after_losses` losses, and return (rc, output).

    SIGTERM to the process, as a scheduler preempting a job does; or with ctrl_c, SIGINT to its whole process
    group, as a terminal's Ctrl-C does (torchrun's workers then get it twice: from the terminal and from torchrun)."""
    env = {**run_env(), "PYTHONUNBUFFERED": "1"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=ctrl_c, **pipes)
    seen, lines = 0, []
    for line in process.stdout:
        lines.append(line)
        seen += "'loss':" in line
        if seen == after_losses:
            if ctrl_c:
                os.killpg(process.pid, signal.SIGINT)
            else:
                process.send_signal(signal.SIGTERM)
            break
    rest, _ = process.communicate(timeout=300)
    return process.returncode, "".join(lines) + rest


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def test_sigterm_saves_a_checkpoint_and_the_printed_command_resumes_to_the_same_end(tmp_path, tiny_vl):
    whole = tmp_path / "whole"
    train(lora_args(tiny_vl, whole, "--max_steps", "12", "--save_strategy", "no"))

    cut = tmp_path / "cut"
    args = lora_args(tiny_vl, cut, "--max_steps", "12", "--save_strategy", "no")
    rc, output = start_and_signal([PYTHON, "finetune.py", *args], after_losses=3)
    assert rc == 128 + signal.SIGTERM, output[-3000:]
    [saved] = checkpoints(cut)  # saved on the signal although saving was off
    step = int(saved.split("-")[1])
    assert 3 <= step < 12 and checkpoint_problems(cut / saved) == []
    assert not (cut / "adapter_model.safetensors").exists()  # no final result pretending the run finished

    resume_line = output[output.index("Resume with:") :].splitlines()[1].strip()
    command = shlex.split(resume_line)
    assert command[:2] == ["python", "finetune.py"] and command[-2:] == ["--resume_from_checkpoint", "auto"]
    resumed = subprocess.run(
        [PYTHON, *command[1:]], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = losses(whole), losses(cut)
    assert sorted(got) == list(range(1, 13))  # the checkpoint's log history, then the resumed steps
    for s in got:
        assert math.isclose(got[s], expected[s], abs_tol=1e-5), (s, got[s], expected[s])


@pytest.mark.distributed
def test_ctrl_c_under_torchrun_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path, tiny_vl):
    out = tmp_path / "out"
    args = lora_args(tiny_vl, out, "--max_steps", "40", "--save_strategy", "no", "--lora_dropout", "0")
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    rc, output = start_and_signal([*command, "finetune.py", *args], after_losses=2, ctrl_c=True)
    assert rc != 0, output[-3000:]
    [saved] = checkpoints(out)
    folder = out / saved
    assert checkpoint_problems(folder) == [] and {"rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in folder.iterdir()
    }
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == int(saved.split("-")[1])
    assert "Resume with:\n  torchrun --nproc_per_node 2 finetune.py" in output


def test_auto_resume_skips_damaged_checkpoints_and_says_why(tmp_path, tiny_vl, caplog):
    out = tmp_path / "out"
    train(lora_args(tiny_vl, out, "--max_steps", "6", "--save_steps", "2"))
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    (out / "checkpoint-6" / "optimizer.pt").unlink()
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    with caplog.at_level(logging.WARNING):
        assert resolve_resume(str(out), "auto", overwrite=False) == str(out / "checkpoint-2")
    skipped = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-6: optimizer.pt missing" in skipped
    assert "checkpoint-4: adapter_model.safetensors is" in skipped and "(truncated)" in skipped
    with pytest.raises(SystemExit, match="checkpoint-4: the checkpoint is incomplete"):
        resolve_resume(str(out), str(out / "checkpoint-4"), overwrite=False)

    trainer = train(
        lora_args(tiny_vl, out, "--max_steps", "6", "--save_steps", "2", "--resume_from_checkpoint", "auto")
    )
    assert trainer.state.global_step == 6 and sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert checkpoint_problems(out / "checkpoint-4") == checkpoint_problems(out / "checkpoint-6") == []

    (out / "checkpoint-6" / "rng_state.pth").write_bytes(b"")  # what a full disk leaves
    (out / "checkpoint-6" / "trainer_state.json").write_text("{")
    assert checkpoint_problems(out / "checkpoint-6") == [
        "trainer_state.json is unreadable (JSONDecodeError)",
        "rng_state.pth is unreadable (File is not a zip file)",
    ]


def test_a_nan_loss_stops_the_run_with_the_step_and_the_fixes(tmp_path, tiny_vl):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        train(lora_args(tiny_vl, out, "--max_steps", "8", "--learning_rate", "1e30", "--save_steps", "1"))
    message = str(stopped.value)
    step = int(message.split(":")[0].removeprefix("step "))
    assert "the loss is nan (not finite)" in message and "a lower --learning_rate (now 1e+30)" in message
    # checkpoints stop before the bad step, and the message names the newest
    assert checkpoints(out) == [f"checkpoint-{s}" for s in range(1, step)]
    assert f"checkpoint-{step - 1}" in message


class PoisonOneStep(TrainerCallback):
    """Turns the embeddings to NaN during one optimizer step, and records the trainable weights around it."""

    def __init__(self, step: int):
        self.step, self.hook, self.before, self.after = step, None, None, None

    def _trainable(self, model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.before = self._trainable(model)
            self.hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * float("nan"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.hook is not None:
            self.hook.remove()
            self.hook, self.after = None, self._trainable(model)


def test_a_nan_step_is_skipped_when_asked_and_training_goes_on(tmp_path, tiny_vl):
    poison = PoisonOneStep(3)
    args = lora_args(tiny_vl, tmp_path / "out", "--max_steps", "6", "--save_strategy", "no", "--on_nonfinite", "skip")
    trainer = train(args, callbacks=(poison,))
    assert all(torch.equal(poison.before[n], poison.after[n]) for n in poison.before)  # the step changed nothing
    guard = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "skipped"))
    assert guard.skipped == [3]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logged = losses(tmp_path / "out")
    assert all(math.isfinite(logged[s]) for s in (4, 5, 6))

    with pytest.raises(SystemExit, match=r"^step 3: the loss is nan"):
        train(lora_args(tiny_vl, tmp_path / "stop", "--max_steps", "6"), callbacks=(PoisonOneStep(3),))


@pytest.fixture
def bad_data(tmp_path, image_server):
    picture(tmp_path / "good.png")
    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")  # 100 M pixels in a few kB
    whole = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    samples = [
        qwen_vl("good", "Picture 1: <img>good.png</img>\nWhat colour?", "Red."),
        qwen_vl("bomb", "Picture 1: <img>bomb.png</img>\nWhat is it?", "Black."),
        qwen_vl("cut", "Picture 1: <img>cut.png</img>\nWhat is it?", "Half."),
        qwen_vl("loop", f"Picture 1: <img>{image_server}/loop</img>\nWhat is it?", "A loop."),
        qwen_vl("page", f"Picture 1: <img>{image_server}/page</img>\nWhat is it?", "A page."),
    ]
    return write_json(tmp_path / "bad.json", samples)


def data_args(model, data, out, *flags) -> list[str]:
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out), *flags]


def test_bad_input_stops_before_training_with_every_problem_or_is_skipped_and_reported(tmp_path, tiny_vl, bad_data):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        train(data_args(tiny_vl, bad_data, out, "--max_steps", "2"))
    message = str(stopped.value)
    assert message.startswith("finetune.py: the data cannot be used: 4 bad sample(s)")
    for sample_id, reason in [
        ("bomb", "too large to decode safely"),
        ("cut", "truncated"),
        ("loop", "redirects more than 5 times"),
        ("page", "not an image"),
    ]:
        line = next(x for x in message.splitlines() if f"sample {sample_id}" in x)
        assert str(bad_data) in line and reason in line, line
    assert not out.exists() or not any(out.iterdir())  # stopped before anything was written

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match=r"empty\.jsonl, whole file: the file is empty"):
        train(data_args(tiny_vl, empty, tmp_path / "o2"))

    trainer = train(data_args(tiny_vl, bad_data, tmp_path / "skip", "--max_steps", "2", "--skip_bad_samples", "True"))
    assert trainer.state.global_step == 2
    report = json.loads((tmp_path / "skip" / "data_report.json").read_text())
    assert report["usable"] == 1 and len(report["bad"]) == 4 and "sample bomb" in " ".join(report["bad"])


def test_the_cli_exits_non_zero_on_bad_data_without_a_traceback(tmp_path, tiny_vl, bad_data):
    result = subprocess.run(
        [PYTHON, "finetune.py", *data_args(tiny_vl, bad_data, tmp_path / "out")],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "4 bad sample(s)" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
