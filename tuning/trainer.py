"""The Trainer the recipe builds, and its parts."""

from __future__ import annotations

import logging

import torch
from transformers import Trainer, TrainerCallback

from tuning.checkpoints import checkpoints_newest_first
from tuning.data.encode import IGNORE_INDEX
from tuning.loss import output_head, supervised_loss
from tuning.runtime import prepare_host_memory

logger = logging.getLogger(__name__)


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
        prepare_host_memory(self.args.device)
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
