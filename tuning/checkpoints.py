"""Checkpoints: whether one can resume the run exactly, which one to resume, the command that resumes, the
run's arguments and the final save."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import struct
import zipfile
from dataclasses import asdict, is_dataclass
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def _zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose directory is at the end: a cut-off file has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"{path.name} is unreadable ({e})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """The header must parse and the file must be as long as the tensors it declares."""
    try:
        with path.open("rb") as f:
            header_size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError) as e:
        return f"{path.name} is unreadable ({e.__class__.__name__})"
    expected, actual = 8 + header_size + end, path.stat().st_size
    if actual != expected:
        return f"{path.name} is {actual} bytes, its header says {expected} (truncated)"
    return None


def _problems(check, paths) -> list[str]:
    return [problem for problem in map(check, paths) if problem]


def _weights_problems(folder: Path) -> list[str]:
    files = [folder / name for name in ("model.safetensors", "adapter_model.safetensors") if (folder / name).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as e:
            return [f"{index.name} is unreadable ({e.__class__.__name__})"]
        missing = [s for s in sorted(shards) if not (folder / s).is_file()]
        if missing:
            return [f"weight shards missing: {', '.join(missing)}"]
        files += [folder / s for s in sorted(shards)]
    if not files:
        return ["no weights (model.safetensors, its index or adapter_model.safetensors)"]
    return _problems(_safetensors_problem, files)


def _optimizer_problems(folder: Path) -> list[str]:
    latest = folder / "latest"
    if latest.is_file():  # DeepSpeed keeps optimizer and engine state in its own tag folder
        tag = folder / latest.read_text().strip()
        states = sorted(tag.glob("*optim_states.pt")) + sorted(tag.glob("*model_states.pt"))
        if not states:
            return [f"DeepSpeed state folder {tag.name} has no optimizer states"]
        return _problems(_zip_problem, states)
    if not (folder / "optimizer.pt").is_file():
        return ["optimizer.pt missing"]
    return _problems(_zip_problem, [folder / "optimizer.pt"])


def checkpoint_problems(folder: str | Path) -> list[str]:
    """What keeps a checkpoint from resuming the run exactly: weights, optimizer, scheduler, RNG and trainer
    state must all be present and readable. Cheap: headers and zip directories only, nothing is unpickled."""
    folder = Path(folder)
    problems = []
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except FileNotFoundError:
        problems.append("trainer_state.json missing")
    except (OSError, ValueError) as e:
        problems.append(f"trainer_state.json is unreadable ({e.__class__.__name__})")
    problems += _weights_problems(folder)
    problems += _optimizer_problems(folder)
    if not (folder / "scheduler.pt").is_file():
        problems.append("scheduler.pt missing")
    else:
        problems += _problems(_zip_problem, [folder / "scheduler.pt"])
    rng_states = sorted(folder.glob("rng_state*.pth"))
    if not rng_states:
        problems.append("no rng_state*.pth")
    problems += _problems(_zip_problem, rng_states)
    return problems


def checkpoints_newest_first(output_dir: str | Path) -> list[Path]:
    found = [
        (int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*") if (m := CHECKPOINT_NAME.match(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True) if p.is_dir()]


def newest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint that can resume the run; every newer one is named with why it was skipped."""
    for folder in checkpoints_newest_first(output_dir):
        problems = checkpoint_problems(folder)
        if not problems:
            return str(folder)
        logger.warning("--resume_from_checkpoint auto: skipping %s: %s", folder, "; ".join(problems))
    return None


def resolve_resume(output_dir: str, resume: str | None, overwrite: bool) -> str | None:
    """The checkpoint to resume from. A folder with checkpoints is never resumed or overwritten silently."""
    existing = checkpoints_newest_first(output_dir) if Path(output_dir).is_dir() else []
    if resume == "auto":
        chosen = newest_complete_checkpoint(output_dir)
        if chosen is None:
            what = "no complete checkpoint" if existing else "no checkpoint"
            logger.warning("--resume_from_checkpoint auto: %s in %s, starting fresh", what, output_dir)
        else:
            logger.info("--resume_from_checkpoint auto: resuming from %s", chosen)
        return chosen
    if resume:
        if not Path(resume).is_dir():
            raise SystemExit(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
        problems = checkpoint_problems(resume)
        if problems:
            raise SystemExit(
                f"--resume_from_checkpoint {resume}: the checkpoint is incomplete: {'; '.join(problems)}. "
                "Choose an older checkpoint, or pass 'auto' to take the newest complete one."
            )
        return resume
    if existing and not overwrite:
        raise SystemExit(
            f"{output_dir} already holds checkpoints (latest: {existing[0].name}). Pass "
            "--resume_from_checkpoint auto to continue that run, --overwrite_output_dir True to start over "
            "in the same folder, or choose another --output_dir."
        )
    return None


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments, resuming from the newest checkpoint."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--resume_from_checkpoint", "--overwrite_output_dir"):
            skip_next = "=" not in arg
            continue
        kept.append(arg)
    launcher = "python finetune.py"
    if "LOCAL_RANK" in os.environ:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", "1")
        nodes = int(os.environ.get("WORLD_SIZE", per_node)) // max(int(per_node), 1)
        launcher = (
            f"torchrun --nproc_per_node {per_node}" + (f" --nnodes {nodes}" if nodes > 1 else "") + " finetune.py"
        )
    return " ".join([launcher, *map(shlex.quote, kept), "--resume_from_checkpoint", "auto"])


class RestoreFullWeights(TrainerCallback):
    """Resuming a full fine-tune: put the checkpoint's weights into the model through from_pretrained.

    transformers 5 saves checkpoints under the hub's original key names (model.layers.0...) but the
    Trainer's resume loads them into the live model (model.language_model.layers.0...) with a non-strict
    load_state_dict: for Qwen-VL models nothing of the language model was restored, silently, and the
    resumed run trained on from the initial weights (step 5 loss 9.16 instead of 8.99).
    """

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        restored = type(model).from_pretrained(
            self.checkpoint, dtype=next(model.parameters()).dtype, use_safetensors=True
        )
        model.load_state_dict(restored.state_dict(), strict=True)
        del restored
        logger.info("restored the full weights of %s (with the key conversion the Trainer skips)", self.checkpoint)


def is_secret(name: str) -> bool:
    """An argument whose value must not be written down: an access token (hub_token and the like)."""
    return name.endswith("_token")


def save_run_args(output_dir: str, **groups) -> None:
    """The arguments of the run, one group per dataclass, as run_args.json: every one but the secrets, so that the
    run can be repeated from the file."""

    def plain(obj):
        data = obj.to_dict() if hasattr(obj, "to_dict") else asdict(obj) if is_dataclass(obj) else dict(obj)
        return {k: v for k, v in data.items() if not k.startswith("_") and not is_secret(k)}

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    payload = {name: plain(group) for name, group in groups.items()}
    (Path(output_dir) / "run_args.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


def save_final(trainer, processing, output_dir: str) -> None:
    """The model or adapter through the Trainer's public API, and the tokenizer/processor beside it."""
    trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        processing.save_pretrained(output_dir)
