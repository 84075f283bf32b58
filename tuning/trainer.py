"""The Trainer a recipe builds, from parts that another trainer (a preference stage) takes as they are.

Each part is a mixin over transformers.Trainer with its own keyword arguments, and composes by inheritance:

    class SupervisedTrainer(ChunkedLoss, TokenBudgetBatches, LearningRatesByPart, NonFiniteGuard, LossScaleLog, Trainer)

- ChunkedLoss: the loss from the hidden states at the supervised positions, never the full logits (tuning.loss);
- TokenBudgetBatches: batches filled up to a number of tokens (tuning.data.batching);
- LearningRatesByPart: parameter-name prefixes (the vision tower, the projector) at learning rates of their own;
- NonFiniteGuard: a NaN or infinite loss or gradient stops the run with a message, or skips the step;
- LossScaleLog: the fp16 loss scale logged with the loss.
"""

from __future__ import annotations

import logging

import torch
from transformers import Trainer, TrainerCallback

from tuning.checkpoints import checkpoints_newest_first
from tuning.data.encode import IGNORE_INDEX
from tuning.loss import LogitTransformMismatch, set_router_loss_weight, supervised_loss, unsupported_reason

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
    (NonFiniteGuard's loss check still applies)."""

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


class ChunkedLoss:
    """Training batches: the loss from the hidden states at the supervised positions (tuning.loss), never the full
    logits, equal to the model's own loss: its logit transform (a soft cap, a scale) applied in the chunks, an MoE
    router's load-balancing term added as its forward adds it. The stock path for `loss_impl="plain"`, evaluation,
    and models whose own loss the chunks cannot reproduce (said once in the log).

    An MoE model trains its router's load-balancing loss on both paths, at the weight `--moe_aux_loss_coef`
    (default: its config's), which its config then keeps."""

    def __init__(self, *args, loss_impl: str = "chunked", **kwargs):
        self.loss_impl = loss_impl
        super().__init__(*args, **kwargs)
        self.stock_loss_reason: str | None = None
        weight = getattr(self.args, "moe_aux_loss_coef", None)
        self.router_loss_weight = set_router_loss_weight(self.model, weight) if self.model is not None else None
        if self.router_loss_weight is not None:
            logger.info("the MoE router's load-balancing loss trains at weight %g", self.router_loss_weight)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.router_loss_weight is not None:
            # asked for by each training forward, not in the config: generate() fails with router logits on
            inputs = {**inputs, "output_router_logits": True}
        if self.loss_impl != "chunked" or not model.training or "labels" not in inputs or self._stock_reason(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        try:
            with supervised_loss(model, labels) as keep:
                outputs = model(**inputs, logits_to_keep=keep)
        except LogitTransformMismatch as e:  # found at the first step: this batch and every later one go stock
            self._use_stock_loss(str(e))
            return super().compute_loss(model, {**inputs, "labels": labels}, return_outputs, num_items_in_batch)
        loss_sum = outputs.logits.reshape(())  # the head returned the summed loss (tuning.loss)
        if num_items_in_batch is not None:  # normalised over the supervised tokens of the whole accumulated step
            loss = loss_sum / num_items_in_batch
        else:
            loss = loss_sum / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        if self.router_loss_weight is not None and outputs.get("aux_loss") is not None:
            loss = loss + self.router_loss_weight * outputs.aux_loss.to(loss.device)  # as the model's forward adds it
        scaled = self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
        if scaled and num_items_in_batch is not None:  # as the stock compute_loss scales the model's own loss
            ranks = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (ranks if self.args.n_gpu <= 1 else self.args.n_gpu)  # the ranks' gradients are averaged
        return (loss, outputs) if return_outputs else loss

    def _stock_reason(self, model) -> str | None:
        if self.stock_loss_reason is None:
            if self.label_smoother is not None or self.compute_loss_func is not None:
                self._use_stock_loss("label smoothing or a compute_loss_func replaces the model's own loss")
            elif (why := unsupported_reason(model)) is not None:
                self._use_stock_loss(why)
        return self.stock_loss_reason

    def _use_stock_loss(self, why: str) -> None:
        self.stock_loss_reason = why
        logger.warning("the stock loss over the full logits trains this model, not the chunked loss: %s", why)


class TokenBudgetBatches:
    """With `max_tokens_per_batch`: each training batch filled with whole samples up to that many tokens
    (tuning.data.batching) instead of a fixed number of samples. The dataset must say its samples' `lengths`."""

    def __init__(self, *args, max_tokens_per_batch: int | None = None, **kwargs):
        self.max_tokens_per_batch = max_tokens_per_batch
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self):
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

    def _get_train_sampler(self, train_dataset=None):
        """--train_sampling_strategy group_by_length with the dataset's own lengths: the stock sampler would read
        every sample to measure it, computing the pixels of every picture in the set before the first step."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if self.args.train_sampling_strategy != "group_by_length" or lengths is None:
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(batch, lengths=lengths)


class LearningRatesByPart:
    """`lr_by_prefix`: the parameters under each name prefix train at a learning rate of their own, in param
    groups of their own (the scheduler then scales every group alike). Prefixes are tried in order: a projector
    inside the vision tower comes first."""

    def __init__(self, *args, lr_by_prefix: dict[str, float] | None = None, **kwargs):
        self.lr_by_prefix = dict(lr_by_prefix or {})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        new = self.optimizer is None  # the Trainer returns an optimizer it made before as it is
        optimizer = super().create_optimizer(model)
        if new and self.lr_by_prefix:
            optimizer.param_groups = self._groups_by_prefix(optimizer.param_groups, model or self.model)
            logger.info("learning rates by parameter group: %s", sorted({g["lr"] for g in optimizer.param_groups}))
        return optimizer

    def _groups_by_prefix(self, groups: list[dict], model) -> list[dict]:
        names = {id(p): n for n, p in model.named_parameters()}
        main, own = [], []  # the main rate's groups first: the logged learning rate is the first group's
        for group in groups:
            by_lr: dict[float, list] = {group["lr"]: []}
            for param in group["params"]:
                by_lr.setdefault(self._lr_for(names.get(id(param), ""), group["lr"]), []).append(param)
            for lr, params in by_lr.items():
                (main if lr == group["lr"] else own).append({**group, "params": params, "lr": lr})
        return main + [g for g in own if g["params"]]

    def _lr_for(self, name: str, default: float) -> float:
        for prefix, lr in self.lr_by_prefix.items():
            if name.startswith(prefix + "."):
                return lr
        return default


class NonFiniteGuard:
    """A loss that is not finite is caught where it happens (the stock Trainer averages it out of the log and trains
    on), and gradients that are not finite before the optimizer step: `on_nonfinite="stop"` stops the run with what
    to try, `"skip"` skips that step."""

    def __init__(self, *args, on_nonfinite: str = "stop", **kwargs):
        self.on_nonfinite = on_nonfinite
        super().__init__(*args, **kwargs)
        self.add_callback(NonFiniteGradients(on_nonfinite))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            step = self.state.global_step + 1
            if self.on_nonfinite == "stop":
                raise SystemExit(nonfinite_message("loss", loss.item(), step, self.args))
            logger.warning("step %d: the loss is %s, the step will be skipped", step, loss.item())
        return loss


class LossScaleLog:
    """Under fp16, the loss scale beside the loss in the log (a falling scale is the first sign of overflow)."""

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


class SupervisedTrainer(ChunkedLoss, TokenBudgetBatches, LearningRatesByPart, NonFiniteGuard, LossScaleLog, Trainer):
    """The fine-tuning trainer: the stock Trainer with every part above. Keyword arguments: the Trainer's, and
    `loss_impl`, `max_tokens_per_batch`, `lr_by_prefix`, `on_nonfinite`."""
