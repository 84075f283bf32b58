"""What train() composes: output-folder rules, callbacks, the final save."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)


def resolve_resume(output_dir: str, resume: str | None, overwrite: bool) -> str | None:
    """The checkpoint to resume from. A folder with checkpoints is never resumed or overwritten silently."""
    existing = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if resume == "auto":
        if existing is None:
            logger.info("--resume_from_checkpoint auto: no checkpoint in %s, starting fresh", output_dir)
        return existing
    if resume:
        if not Path(resume).is_dir():
            raise SystemExit(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
        return resume
    if existing and not overwrite:
        raise SystemExit(
            f"{output_dir} already holds checkpoints (latest: {Path(existing).name}). Pass "
            "--resume_from_checkpoint auto to continue that run, --overwrite_output_dir True to start over "
            "in the same folder, or choose another --output_dir."
        )
    return None


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
        restored = type(model).from_pretrained(self.checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(restored.state_dict(), strict=True)
        del restored
        logger.info("restored the full weights of %s (with the key conversion the Trainer skips)", self.checkpoint)


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
