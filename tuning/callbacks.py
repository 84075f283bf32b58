"""Callbacks of a training run: a signal checkpoint, MLP tiling, throughput, sample answers, the loss picture."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from tuning.families import GATED_MLP
from tuning.tiled_mlp import tile_mlps

logger = logging.getLogger(__name__)


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


class TileMLPs(TrainerCallback):
    """Runs the MLPs a tile of tokens at a time (tuning/tiled_mlp.py) from the start of training. Not earlier:
    Trainer.train applies --use_liger_kernel first, binding Liger's SwiGLU as each MLP's forward, which the tiles
    then run; tiled before, the MLPs would run Liger's kernel on the whole row. `projections` are the names of the
    gated MLP's gate, up and down projections in the model's family."""

    def __init__(self, tile_tokens: int | None, projections: tuple[str, str, str] = GATED_MLP):
        self.tile_tokens = tile_tokens
        self.projections = projections

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        count = tile_mlps(model, self.tile_tokens, self.projections)
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

    A prompt "PATH::question" comes with that picture. Generation is greedy and shares tuning.chat's code; prompts
    are built by the run's own encoder, so they render and load pictures exactly as the training data."""

    def __init__(self, prompts: list[str], every: int, encoder, max_new_tokens: int = 64):
        self.prompts = [self._parse(p) for p in prompts]
        self.every, self.encoder, self.max_new_tokens = every, encoder, max_new_tokens

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
        from tuning.chat import Chat, GenerationSettings

        was_training = model.training
        model.eval()
        encoder = self.encoder
        settings = GenerationSettings(self.max_new_tokens)
        chat = Chat(model, encoder.tokenizer, encoder.processor, settings=settings, encoder=encoder)
        with open(Path(args.output_dir) / "samples.jsonl", "a", encoding="utf-8") as out:
            for path, question in self.prompts:
                chat.reset()
                answer = chat.ask(question, [path] if path else None)
                logger.info("step %d sample: %s -> %r", state.global_step, question, answer)
                line = {"step": state.global_step, "image": path, "prompt": question, "answer": answer}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
        model.train(was_training)


class LossPlotCallback(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_losses(state.log_history, Path(args.output_dir) / "loss.png")
