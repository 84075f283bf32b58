"""What train() composes: output-folder rules, callbacks, the final save."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import struct
import threading
import time
import zipfile
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from tuning.data.encode import IGNORE_INDEX
from tuning.host_memory import LARGE_BLOCK_BYTES, map_large_blocks_apart
from tuning.loss import output_head, supervised_loss
from tuning.tiled_mlp import tile_mlps

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


class StopOnSignal(TrainerCallback):
    """SIGTERM or SIGINT (a preempted job, Ctrl-C): every rank saves a checkpoint at the end of the step it is
    in, and training stops. The ranks agree on the step, so no rank waits in a collective the others left."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.saved_at: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            # torchrun forwards the terminal's Ctrl-C a second time: stay on course to save
            logger.warning("%s again: already stopping at the end of this step (SIGKILL stops at once)", name)
            return
        self.received = signum
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping", name)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if self._received_anywhere(args):
            control.should_save = True
            control.should_training_stop = True
            self.saved_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _received_anywhere(self, args) -> bool:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([self.received or 0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if self.received is None and flag.item():
                self.received = int(flag.item())
        return self.received is not None


def nonfinite_message(what: str, value: float, step: int, args) -> str:
    fixes = ["--bf16 True instead of --fp16 (fp16 overflows)"] if args.fp16 else []
    fixes.append(f"a lower --learning_rate (now {args.learning_rate:g})")
    if not 0 < args.max_grad_norm <= 1:
        fixes.append(f"gradient clipping with --max_grad_norm 1.0 (now {args.max_grad_norm:g})")
    fixes.append("a look at the samples of this step")
    newest = checkpoints_newest_first(args.output_dir)
    kept = f"the newest checkpoint is {newest[0]}" if newest else "no checkpoint was saved yet"
    return (
        f"step {step}: the {what} is {value} (not finite). Training stopped; nothing after it was saved, "
        f"{kept}. Likely fixes: {'; '.join(fixes)}. --on_nonfinite skip skips such steps instead of stopping."
    )


class NonFiniteGradients(TrainerCallback):
    """Before the optimizer step: gradients that are not finite stop the run or, if asked, skip the step.

    Under fp16 the loss scaler already skips overflowing steps; under DeepSpeed the gradients live in the engine
    (the loss check in GuardedTrainer still applies)."""

    def __init__(self, policy: str):
        self.policy = policy
        self.skipped: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or args.deepspeed or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or torch.stack([g.isfinite().all() for g in grads]).all():
            return
        step = state.global_step + 1
        if self.policy == "stop":
            raise SystemExit(nonfinite_message("gradient", float("nan"), step, args))
        model.zero_grad(set_to_none=True)  # the optimizer passes over parameters without gradients
        self.skipped.append(step)
        logger.warning("step %d: gradients are not finite, step skipped (%d so far)", step, len(self.skipped))


class GuardedTrainer(Trainer):
    """The Trainer, with a non-finite loss caught where it happens (the stock Trainer averages it out of the
    log and trains on) and the fp16 loss scale logged with the loss."""

    def __init__(
        self,
        *args,
        on_nonfinite: str = "stop",
        lr_by_prefix: dict[str, float] | None = None,
        loss_impl: str = "chunked",
        max_tokens_per_batch: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.on_nonfinite = on_nonfinite
        self.lr_by_prefix = lr_by_prefix or {}  # e.g. the vision tower and the projector at their own rates
        self.loss_impl = loss_impl
        self.add_callback(NonFiniteGradients(on_nonfinite))

    def train(self, *args, **kwargs):
        if self.args.device.type == "cpu" and map_large_blocks_apart():
            mib = LARGE_BLOCK_BYTES // 2**20
            logger.info("host memory: blocks of %d MiB and more are returned when freed (tuning/host_memory.py)", mib)
        return super().train(*args, **kwargs)

    def get_train_dataloader(self):
        """With --max_tokens_per_batch: batches filled up to that many tokens (tuning.data.batching)."""
        if not self.max_tokens_per_batch:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        from tuning.data.batching import TokenBudgetBatchSampler

        sampler = TokenBudgetBatchSampler(self.train_dataset.lengths, self.max_tokens_per_batch, seed=self.args.seed)
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training batches: the loss from the hidden states at the supervised positions (tuning.loss), never the
        full logits. The stock path for --loss_impl plain, evaluation, and heads that are not plain linear layers."""
        if self.loss_impl != "chunked" or not model.training or "labels" not in inputs or output_head(model) is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        with supervised_loss(model, labels) as keep:
            outputs = model(**inputs, logits_to_keep=keep)
        loss_sum = outputs.logits.reshape(())  # the head returned the summed loss (tuning.loss)
        if num_items_in_batch is not None:  # normalised over the supervised tokens of the whole accumulated step
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # the gradients are averaged over the ranks
        else:
            loss = loss_sum / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the parameters under each prefix of lr_by_prefix in groups of their own
        learning rate (the scheduler then scales every group alike)."""
        optimizer = super().create_optimizer(model)
        if self.lr_by_prefix and not getattr(optimizer, "_split_by_prefix", False):
            names = {id(p): n for n, p in (model or self.model).named_parameters()}
            main, own = [], []  # the main rate's groups first: the logged learning rate is the first group's
            for group in optimizer.param_groups:
                by_lr: dict[float, list] = {group["lr"]: []}
                for param in group["params"]:
                    by_lr.setdefault(self._lr_for(names.get(id(param), ""), group["lr"]), []).append(param)
                for lr, params in by_lr.items():
                    (main if lr == group["lr"] else own).append({**group, "params": params, "lr": lr})
            groups = main + [g for g in own if g["params"]]
            optimizer.param_groups = groups
            optimizer._split_by_prefix = True
            logger.info("learning rates by parameter group: %s", sorted({g["lr"] for g in groups}))
        return optimizer

    def _lr_for(self, name: str, default: float) -> float:
        for prefix, lr in self.lr_by_prefix.items():  # in order: the projector sits inside the vision tower
            if name.startswith(prefix + "."):
                return lr
        return default

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            step = self.state.global_step + 1
            if self.on_nonfinite == "stop":
                raise SystemExit(nonfinite_message("loss", loss.item(), step, self.args))
            logger.warning("step %d: the loss is %s, the step will be skipped", step, loss.item())
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.args.fp16 and "loss" in logs and (scale := self.loss_scale()) is not None:
            logs["loss_scale"] = scale
        super().log(logs, start_time)

    def loss_scale(self) -> float | None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        optimizer = getattr(self.model_wrapped, "optimizer", None)  # a DeepSpeed engine's fp16 optimizer
        for name in ("cur_scale", "loss_scale"):
            if isinstance(value := getattr(optimizer, name, None), (int, float)):
                return float(value)
        return None


class TileMLPs(TrainerCallback):
    """Runs the MLPs a tile of tokens at a time (tuning/tiled_mlp.py) from the start of training. Not earlier:
    Trainer.train applies --use_liger_kernel first, binding Liger's SwiGLU as each MLP's forward, which the tiles
    then run; tiled before, the MLPs would run Liger's kernel on the whole row."""

    def __init__(self, tile_tokens: int | None):
        self.tile_tokens = tile_tokens

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        count = tile_mlps(model, self.tile_tokens)
        tile = self.tile_tokens or "intermediate/hidden of the row's"
        if count:
            logger.info("mlp: %d MLPs run a tile of %s tokens at a time in training (tuning/tiled_mlp.py)", count, tile)


class ThroughputCallback(TrainerCallback):
    """Logs real (non-padding) tokens per second per device beside the loss."""

    def __init__(self, world_size: int):
        self.world_size = max(world_size, 1)
        self.last_time: float | None = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.last_time is None:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen - self.last_tokens
        if now > self.last_time and tokens > 0:
            logs["tokens_per_second_per_device"] = round(tokens / (now - self.last_time) / self.world_size, 1)
        self.last_time, self.last_tokens = now, state.num_input_tokens_seen


def plot_losses(log_history: list[dict], path: Path) -> Path | None:
    """Train and eval loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for points, label in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class SampleGenerationCallback(TrainerCallback):
    """Answers a fixed list of prompts every N steps, into the log and samples.jsonl (XTuner's EvaluateChatHook).

    A prompt "PATH::question" comes with that picture. Generation is greedy and shares tuning.chat's code."""

    def __init__(self, prompts: list[str], every: int, tokenizer, processor, max_new_tokens: int = 64):
        self.prompts = [self._parse(p) for p in prompts]
        self.every, self.tokenizer, self.processor, self.max_new_tokens = every, tokenizer, processor, max_new_tokens

    @staticmethod
    def _parse(prompt: str) -> tuple[str | None, str]:
        path, sep, question = prompt.partition("::")
        return (path, question) if sep else (None, prompt)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.generate(args, state, model)

    def generate(self, args, state, model) -> None:
        if not state.is_world_process_zero:
            return
        from PIL import Image

        from tuning.chat import Chat, GenerationSettings

        was_training = model.training
        model.eval()
        chat = Chat(model, self.tokenizer, self.processor, settings=GenerationSettings(self.max_new_tokens))
        with open(Path(args.output_dir) / "samples.jsonl", "a", encoding="utf-8") as out:
            for path, question in self.prompts:
                chat.reset()
                images = [Image.open(path).convert("RGB")] if path else None
                answer = chat.ask(question, images)
                logger.info("step %d sample: %s -> %r", state.global_step, question, answer)
                line = {"step": state.global_step, "image": path, "prompt": question, "answer": answer}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
        model.train(was_training)


class LossPlotCallback(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_losses(state.log_history, Path(args.output_dir) / "loss.png")


def save_run_args(output_dir: str, **groups) -> None:
    """The arguments of the run, one group per dataclass, as run_args.json."""

    def plain(obj):
        data = obj.to_dict() if hasattr(obj, "to_dict") else asdict(obj) if is_dataclass(obj) else dict(obj)
        return {k: v for k, v in data.items() if not k.startswith("_") and "token" not in k}

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    payload = {name: plain(group) for name, group in groups.items()}
    (Path(output_dir) / "run_args.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


def save_final(trainer, processing, output_dir: str) -> None:
    """The model or adapter through the Trainer's public API, and the tokenizer/processor beside it."""
    trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        processing.save_pretrained(output_dir)
