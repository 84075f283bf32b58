"""The preference stages on the trainer parts of tuning.trainer: DPO and its family, ORPO and SimPO (--stage dpo).

A batch holds every pair's chosen and rejected sequence (tuning.data.collate.PairCollator), packed padding-free like
SFT, and goes through the model once. Each sequence's log-probability is the sum over its supervised tokens (the
answer, end-of-turn included) of log p(token), computed from the hidden states at those positions through the chunked
head (tuning.loss.token_log_probs), never the full logits.

The reference is the starting weights, by construction: the base with the fresh adapter switched off (LoRA); the
adapter a run continues from (--lora_weight_path), whose log-probabilities are computed before the first step; a
frozen copy of the starting model (full fine-tuning), or --ref_model. --precompute_ref_log_probs computes them all
once before training. ORPO and SimPO need none.

The logged metrics have TRL's names and definitions: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected, logits/chosen, logits/rejected (means over the batch's pairs).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Trainer

from tuning.data.encode import IGNORE_INDEX
from tuning.loss import LogitTransformMismatch, set_router_loss_weight, token_log_probs, unsupported_reason
from tuning.trainer import LearningRatesByPart, LossScaleLog, NonFiniteGuard, TokenBudgetBatches

logger = logging.getLogger(__name__)

# the DPO family (TRL's loss_type names) and the two that need no reference model (TRL's ORPO and CPO trainers)
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair")
REFERENCE_FREE = ("orpo", "simpo")
PREF_LOSSES = (*DPO_LOSSES, *REFERENCE_FREE)


@dataclass
class PreferenceArguments:
    pref_loss: str = field(
        default="sigmoid",
        metadata={
            "help": "The preference loss of --stage dpo, by TRL's names: sigmoid (DPO), ipo, hinge (SLiC), robust "
            "(rDPO), bco_pair, sppo_hard, nca_pair; orpo and simpo need no reference model.",
            "choices": list(PREF_LOSSES),
        },
    )
    pref_beta: float = field(
        default=0.1, metadata={"help": "beta: how far from the reference the policy may move (ORPO: lambda)."}
    )
    pref_ftx: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a supervised loss on the chosen answer added to the preference loss (LLaMA-Factory's "
            "pref_ftx, TRL's rpo_alpha): its mean negative log-likelihood per token."
        },
    )
    dpo_label_smoothing: float = field(
        default=0.0,
        metadata={"help": "cDPO / rDPO: the probability that a pair's labels are flipped (sigmoid, robust; < 0.5)."},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin."})
    ld_alpha: float | None = field(
        default=None,
        metadata={
            "help": "LD-DPO: the tokens of the longer answer past the shorter one's length count with this weight "
            "(0 to 1) in its log-probability. Default: off."
        },
    )
    ref_model: str | None = field(
        default=None,
        metadata={"help": "The reference model (a folder or hub name). Default: the starting weights (see the docs)."},
    )
    kto_chosen_weight: float = field(
        default=1.0,
        metadata={"help": "--stage kto: the weight of a desirable completion's loss (TRL's desirable_weight)."},
    )
    kto_rejected_weight: float = field(
        default=1.0,
        metadata={"help": "--stage kto: the weight of an undesirable completion's loss (TRL's undesirable_weight)."},
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "--stage rm: weight of the mean squared reward added to the loss, which keeps the rewards "
            "centred on 0 (TRL's; 0.01 is usual). Default: off."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probabilities of every pair once before training (two numbers a "
            "pair), so that no reference forward runs while training and no reference model stays in memory."
        },
    )

    def problems(self, stage: str) -> list[str]:
        found = []
        if stage not in ("dpo", "kto"):
            return found
        if stage == "kto" and min(self.kto_chosen_weight, self.kto_rejected_weight) <= 0:
            found.append("--kto_chosen_weight and --kto_rejected_weight must be positive")
        if self.pref_beta <= 0:
            found.append(f"--pref_beta must be positive, got {self.pref_beta}")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            found.append(f"--dpo_label_smoothing must be in [0, 0.5), got {self.dpo_label_smoothing}")
        if self.dpo_label_smoothing and self.pref_loss not in ("sigmoid", "robust", "simpo"):
            found.append(f"--dpo_label_smoothing applies to sigmoid, robust and simpo, not {self.pref_loss}")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            found.append(f"--ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.pref_ftx < 0:
            found.append(f"--pref_ftx must be at least 0, got {self.pref_ftx}")
        if self.pref_loss in REFERENCE_FREE and (self.ref_model or self.precompute_ref_log_probs):
            found.append(f"--pref_loss {self.pref_loss} uses no reference model: drop --ref_model and --precompute")
        return found

    @property
    def needs_reference(self) -> bool:
        return self.pref_loss not in REFERENCE_FREE


# -- the losses ---------------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per-sequence log-probabilities of a batch's pairs, chosen and rejected, each of shape (pairs,): sums over
    each answer's supervised tokens, and how many there are."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def averaged(self) -> Scores:
        """Mean token log-probabilities (ORPO and SimPO score an answer by its mean)."""
        chosen, rejected = self.chosen_tokens.clamp(min=1), self.rejected_tokens.clamp(min=1)
        return Scores(self.chosen / chosen, self.rejected / rejected, self.chosen_tokens, self.rejected_tokens)


@dataclass
class PairLoss:
    """What a preference loss gives for a batch: the loss of each pair, the rewards TRL logs for it, extra metrics."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict = field(default_factory=dict)


def preference_loss(options: PreferenceArguments, policy: Scores, reference: Scores | None) -> PairLoss:
    """--pref_loss on summed scores, each as TRL 1.16 defines the loss of that name (DPOTrainer's loss_type; ORPO
    and SimPO as its ORPO and CPO trainers, on mean token log-probabilities), and cDPO's label smoothing on sigmoid.
    Rewards are TRL's: beta times the log-ratio of the sums (ORPO, SimPO: beta times the mean)."""
    kind, beta, smoothing = options.pref_loss, options.pref_beta, options.dpo_label_smoothing
    if kind in REFERENCE_FREE:
        mean = policy.averaged()
        chosen_rewards, rejected_rewards = beta * mean.chosen.detach(), beta * mean.rejected.detach()
        if kind == "orpo":
            # log odds = log(p / (1 - p)) of each answer's mean token probability p; log(1 - p) as log1mexp, which
            # neither overflows nor loses precision where p is near 1 (TRL #2564, #3237 were NaN)
            log_odds = (mean.chosen - mean.rejected) - (_log1mexp(mean.chosen) - _log1mexp(mean.rejected))
            ratio = F.logsigmoid(log_odds)
            metrics = {"log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()}
            return PairLoss(-beta * ratio, chosen_rewards, rejected_rewards, metrics)
        logits = (mean.chosen - mean.rejected) - options.simpo_gamma / beta
        return PairLoss(_smoothed_sigmoid(beta * logits, smoothing), chosen_rewards, rejected_rewards)
    chosen_ratio, rejected_ratio = policy.chosen - reference.chosen, policy.rejected - reference.rejected
    logits = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = _smoothed_sigmoid(beta * logits, smoothing)
    elif kind == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - smoothing) + F.logsigmoid(-beta * logits) * smoothing) / (
            1 - 2 * smoothing
        )
    elif kind == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif kind == "ipo":  # on the log-ratios per token
        chosen, rejected = policy.chosen_tokens.clamp(min=1), policy.rejected_tokens.clamp(min=1)
        losses = (chosen_ratio / chosen - rejected_ratio / rejected - 1 / (2 * beta)) ** 2
    elif kind == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    elif kind == "sppo_hard":
        losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    elif kind == "nca_pair":
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        losses = (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    else:
        raise ValueError(f"unknown --pref_loss {kind!r}: one of {', '.join(PREF_LOSSES)}")
    return PairLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def _smoothed_sigmoid(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-log sigmoid(logits), with the probability `smoothing` that the pair's labels are flipped (cDPO)."""
    return -F.logsigmoid(logits) * (1 - smoothing) - F.logsigmoid(-logits) * smoothing


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Mächler's rule); x = 0 is clamped just below."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# -- per-sequence log-probabilities ---------------------------------------------------------------------------------


PAIR_KEYS = ("margin", "reference_log_probs", "pair_pictures", "pictures_per_pair")


def sequence_log_probs(
    model, inputs: dict, chunked: bool = True, pictures: list | None = None, router: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token log-probabilities of the supervised tokens, their sequence numbers, their mean logits) of one
    forward of the batch; chunked through the head where the model allows, else from its full logits. `pictures`:
    every sequence's picture features, encoded already (shared_pictures), given to the model instead of pixels.
    `router`: an MoE model is asked for its router's load-balancing loss, left in router["aux_loss"]."""
    inputs = dict(inputs)
    if router is not None:
        inputs["output_router_logits"] = True
    labels, index = inputs.pop("labels"), inputs.pop("sequence_index")
    for key in PAIR_KEYS:
        inputs.pop(key, None)
    if pictures is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs.pop("pixel_values")
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(pictures))}
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    sequences = index[keep]
    if chunked and unsupported_reason(model) is None:
        with token_log_probs(model, labels) as kept:
            outputs = model(**inputs, logits_to_keep=kept)
        _router_loss(outputs, router)
        carried = outputs.logits.reshape(-1)
        values, means = carried.float().split(len(carried) // 2)
        return values, sequences, means
    outputs = model(**inputs)
    _router_loss(outputs, router)
    logits = outputs.logits[keep].float()  # (kept, vocab): the full logits, at the kept positions
    targets = labels[:, 1:][keep[:, :-1]]
    values = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    return values, sequences, logits.detach().mean(-1)


def _router_loss(outputs, router: dict | None) -> None:
    if router is not None and outputs.get("aux_loss") is not None:
        router["aux_loss"] = outputs.aux_loss


def shared_pictures(model, inputs: dict) -> list | None:
    """Each pair's pictures through the vision tower once for both answers (TRL runs them once per answer): the
    features of the chosen answers' pictures, each pair's given to its rejected answer too. None where the batch
    has no such pictures, or the family's model takes no encoded features (its answers then see the pixels)."""
    pictures = inputs.get("pair_pictures")
    inner = _base_model(model)
    encode = getattr(inner, "get_image_features", None)
    if pictures is None or encode is None or "mm_encoder_outputs" not in inspect.signature(inner.forward).parameters:
        return None
    accepted = inspect.signature(encode).parameters
    features = list(encode(**{k: v for k, v in pictures.items() if k in accepted}, return_dict=True).pooler_output)
    counts = inputs["pictures_per_pair"].tolist()
    if len(features) != sum(counts):  # not one feature block a picture: the pixels go in as they are
        return None
    full, start = [], 0
    for count in counts:
        full += features[start : start + count] * 2  # the chosen answer, then the rejected one
        start += count
    return full


def _base_model(model):
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def per_sequence(values: torch.Tensor, sequences: torch.Tensor, count: int) -> torch.Tensor:
    """The sum of `values` of each sequence 0..count-1."""
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, sequences, values)


def length_desensitised(values: torch.Tensor, sequences: torch.Tensor, counts: torch.Tensor, alpha: float):
    """LD-DPO (TRL's ld_alpha): each answer's tokens past the shorter answer's length of its pair weigh `alpha`;
    `counts`: each sequence's supervised tokens (chosen, rejected, chosen, ...)."""
    shorter = torch.minimum(counts[0::2], counts[1::2]).repeat_interleave(2)
    # the position of each token within its sequence's supervised tokens (tokens come in sequence order)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(values), device=values.device) - starts[sequences].long()
    weights = torch.where(position < shorter[sequences], 1.0, alpha)
    return per_sequence(values * weights, sequences, len(counts))


def scores_of(values: torch.Tensor, sequences: torch.Tensor, pairs: int, ld_alpha: float | None = None) -> Scores:
    """Chosen and rejected scores of each pair: sums of the token log-probabilities (LD-DPO's weighted sums with
    `ld_alpha`), and the token counts."""
    counts = per_sequence(torch.ones_like(values), sequences, 2 * pairs)
    if ld_alpha is not None:
        sums = length_desensitised(values, sequences, counts, ld_alpha)
    else:
        sums = per_sequence(values, sequences, 2 * pairs)
    return Scores(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


# -- the trainer ----------------------------------------------------------------------------------------------------


class Reference:
    """Where the reference log-probabilities come from. `kind`: "adapter-off" (the policy with its adapter switched
    off: a fresh LoRA's base), "model" (a model of its own: a frozen copy, or --ref_model), "policy" (the policy as
    it starts: the adapter a run continues from; precomputed by construction), "adapter" (that adapter again,
    frozen beside the trained one, live: KTO) or "none" (ORPO, SimPO). `precompute`: computed for every pair before
    the first step, then read from the batch."""

    def __init__(self, kind: str, model=None, precompute: bool = False):
        self.kind, self.model = kind, model
        self.precompute = precompute or kind == "policy"

    @contextlib.contextmanager
    def forward_of(self, policy):
        """The module whose forward is the reference's."""
        inner = getattr(policy, "module", policy)
        if self.kind == "adapter-off":
            with inner.disable_adapter():
                yield policy
        elif self.kind == "adapter":  # the adapter the run started from, loaded again beside it, frozen
            inner.set_adapter(REFERENCE_ADAPTER)
            try:
                yield policy
            finally:
                inner.set_adapter("default")  # which also leaves only the trained adapter requiring gradients
        elif self.kind == "model":
            yield self.model
        else:
            yield policy


REFERENCE_ADAPTER = "reference"


def with_reference_adapter(model, path: str):
    """The starting adapter again, as a frozen adapter of its own beside the trained one (a live reference for a run
    that continues from it); the model then saves the trained adapter alone."""
    import functools

    model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter("default")
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=["default"])
    return model


class StageLoss:
    """What the preference stages share: their loss is a mean over the batch (so the Trainer divides it by the
    accumulation steps), the reference, the metrics each batch stores and each log averages (eval_ at evaluation,
    across the ranks), evaluation by the same loss."""

    def __init__(self, *args, preference: PreferenceArguments, reference: Reference, loss_impl="chunked", **kwargs):
        self.preference, self.reference, self.loss_impl = preference, reference, loss_impl
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.stored_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        if reference.model is not None and not reference.precompute:
            reference.model.to(self.args.device)
        weight = getattr(self.args, "moe_aux_loss_coef", None)
        self.router_loss_weight = set_router_loss_weight(self.model, weight) if self.model is not None else None

    def batch_loss(self, model, inputs) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.batch_loss(model, inputs)
        self._store(metrics, "train" if model.training else "eval")
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, metrics = self.batch_loss(model, inputs)
        self._store(metrics, "eval")
        return loss.detach(), None, None

    def _log_probs(self, model, inputs, pictures: list | None = None, router: dict | None = None):
        """The policy's forward. An MoE model in training also gives its router's load-balancing loss, which the
        stage adds at --moe_aux_loss_coef as TRL's trainers add it (`router`, filled)."""
        chunked = self.loss_impl == "chunked"
        if router is not None and not (model.training and self.router_loss_weight is not None):
            router = None
        try:
            return sequence_log_probs(model, inputs, chunked, pictures, router)
        except LogitTransformMismatch as e:
            logger.warning("the full logits score this model's answers, not the chunked head: %s", e)
            self.loss_impl = "plain"
            return sequence_log_probs(model, inputs, False, pictures, router)

    def _with_router_loss(self, loss: torch.Tensor, router: dict, metrics: dict) -> torch.Tensor:
        if "aux_loss" not in router:
            return loss
        metrics["aux_loss"] = router["aux_loss"].detach()
        return loss + self.router_loss_weight * router["aux_loss"].to(loss.device)

    def _reference_log_probs(self, model, inputs, policy_pictures: list | None = None):
        """The reference's forward of the batch, under no_grad. With a frozen vision side (tower and projector) its
        picture features are the policy's, encoded once for both."""
        reuse = policy_pictures is not None and self._vision_frozen(model)  # asked before the adapter is off
        with torch.no_grad(), self.reference.forward_of(model) as reference:
            pictures = [p.detach() for p in policy_pictures] if reuse else shared_pictures(reference, inputs)
            return sequence_log_probs(reference, inputs, self.loss_impl == "chunked", pictures)

    def _vision_frozen(self, model) -> bool:
        if not hasattr(self, "_frozen_vision"):
            from tuning.model import vision_parts

            towers, projectors = vision_parts(_base_model(model))
            prefixes = tuple(f"{p}." for p in (*towers, *projectors))
            trained = [
                n for n, p in _base_model(model).named_parameters() if p.requires_grad and n.startswith(prefixes)
            ]
            self._frozen_vision = bool(prefixes) and not trained
        return self._frozen_vision

    def _store(self, metrics: dict, mode: str) -> None:
        """A metric is a value (averaged over the batches of a log) or a (sum, count) pair (summed, then divided)."""
        for key, value in metrics.items():
            if isinstance(value, tuple):
                value = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in value])
            self.stored_metrics[mode][key].append(value.detach().float().reshape(-1).cpu())

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + key: value for key, value in self.logged_metrics(mode).items()})
        super().log(logs, start_time)

    def logged_metrics(self, mode: str) -> dict:
        """The stored metrics of `mode` since the last log, over the ranks; cleared."""
        found, stored = {}, self.stored_metrics[mode]
        for key, values in stored.items():  # the same keys in the same order on every rank: the gathers pair up
            stacked = torch.stack(values).to(self.args.device)
            if stacked.shape[1] == 1:
                found[key] = self.accelerator.gather_for_metrics(stacked.mean()[None]).mean().item()
                continue
            total, count = self.accelerator.gather(stacked.sum(0)[None]).sum(0).tolist()
            if count:
                found[key] = total / count
        stored.clear()
        return found


class PreferenceLoss(StageLoss):
    """--stage dpo: one forward of both answers of every pair, the reference's scores (live, under no_grad, or
    precomputed), --pref_loss with TRL's metrics."""

    def train(self, *args, **kwargs):
        if self.reference.precompute:
            for dataset in (self.train_dataset, self.eval_dataset):
                if dataset is not None and dataset.reference_log_probs is None:
                    dataset.reference_log_probs = self.precompute_reference(dataset)
            if self.reference.model is not None:  # nothing reads it again
                self.reference.model = None
        return super().train(*args, **kwargs)

    def precompute_reference(self, dataset) -> torch.Tensor:
        """(pairs, 2): the reference's scores of every pair's chosen and rejected answer, each rank computing its
        share (in evaluation mode, without gradients) and the ranks exchanging them."""
        rank, ranks = self.args.process_index, self.args.world_size
        model = self.model
        if self.reference.model is not None:
            self.reference.model.to(self.args.device)
        elif next(model.parameters()).device != self.args.device:
            model.to(self.args.device)  # under DeepSpeed the engine places it later; the forward must run now
        batch_size = self.args.per_device_eval_batch_size
        mine = list(range(rank, len(dataset), ranks))
        found: dict[int, tuple[float, float]] = {}
        was_training = model.training
        model.eval()
        for start in range(0, len(mine), batch_size):
            indices = mine[start : start + batch_size]
            inputs = self._prepare_inputs(self.data_collator([dataset[i] for i in indices]))
            values, sequences, _ = self._reference_log_probs(model, inputs)
            scores = scores_of(values, sequences, len(indices), self.preference.ld_alpha)
            found.update(zip(indices, zip(scores.chosen.tolist(), scores.rejected.tolist(), strict=True), strict=True))
        model.train(was_training)
        if ranks > 1:
            shares = [None] * ranks
            torch.distributed.all_gather_object(shares, found)
            found = {k: v for share in shares for k, v in share.items()}
        logger.info("reference log-probabilities of %d pairs computed", len(found))
        return torch.tensor([found[i] for i in range(len(dataset))], dtype=torch.float32)

    def batch_loss(self, model, inputs) -> tuple[torch.Tensor, dict]:
        """The batch's mean loss over pairs, and its metrics (TRL's names, means over the pairs)."""
        options = self.preference
        pairs = len(inputs["margin"])
        pictures = shared_pictures(model, inputs)  # each pair's pictures through the tower once
        router: dict = {}
        values, sequences, means = self._log_probs(model, inputs, pictures, router)
        policy = scores_of(values, sequences, pairs, options.ld_alpha)
        reference = self.reference_scores(model, inputs, policy, pictures) if options.needs_reference else None
        result = preference_loss(options, policy, reference)
        loss = result.losses.mean()
        shown = policy.averaged() if options.pref_loss in REFERENCE_FREE else policy
        mean_logits = per_sequence(means, sequences, 2 * pairs)  # TRL's logits/*: token-weighted
        metrics = {
            "rewards/chosen": result.chosen_rewards.mean(),
            "rewards/rejected": result.rejected_rewards.mean(),
            "rewards/accuracies": (result.chosen_rewards > result.rejected_rewards).float().mean(),
            "rewards/margins": (result.chosen_rewards - result.rejected_rewards).mean(),
            "logps/chosen": shown.chosen.detach().mean(),
            "logps/rejected": shown.rejected.detach().mean(),
            "logits/chosen": mean_logits[0::2].sum() / policy.chosen_tokens.sum().clamp(min=1),
            "logits/rejected": mean_logits[1::2].sum() / policy.rejected_tokens.sum().clamp(min=1),
            **result.metrics,
        }
        weight = 1.0 if options.pref_loss == "orpo" else options.pref_ftx
        if weight:
            # the chosen answers' mean negative log-likelihood per token (TRL's "sft" loss term, ORPO's nll_loss)
            chosen_tokens = sequences % 2 == 0
            nll = -values[chosen_tokens].sum() / chosen_tokens.sum().clamp(min=1)
            loss = loss + weight * nll
            metrics["nll_loss"] = nll.detach()
        return self._with_router_loss(loss, router, metrics), metrics

    def reference_scores(self, model, inputs, policy: Scores, pictures: list | None = None) -> Scores:
        """The reference's scores of the batch: precomputed in it, or by a forward under no_grad."""
        if "reference_log_probs" in inputs:
            found = inputs["reference_log_probs"].to(policy.chosen.device)
            return Scores(found[:, 0], found[:, 1], policy.chosen_tokens, policy.rejected_tokens)
        if self.reference.precompute:
            raise RuntimeError("the reference log-probabilities were to be precomputed, and this batch has none")
        values, sequences, _ = self._reference_log_probs(model, inputs, pictures)
        return scores_of(values, sequences, len(policy.chosen), self.preference.ld_alpha)


class KTOLoss(StageLoss):
    """--stage kto, as TRL's KTOTrainer (loss_type "kto"): each completion's log-ratio to the reference, against the
    KL term estimated from the batch's mismatched prompt-completion pairs (UnpairedCollator), clamped at 0 and
    averaged over the ranks; desirable completions weigh --kto_chosen_weight, undesirable --kto_rejected_weight."""

    def batch_loss(self, model, inputs) -> tuple[torch.Tensor, dict]:
        options, beta = self.preference, self.preference.pref_beta
        desirable = inputs["desirable"].bool()
        count = len(desirable)
        router: dict = {}
        values, sequences, means = self._log_probs(model, inputs, router=router)
        logps = per_sequence(values, sequences, count)
        reference_values, reference_sequences, _ = self._reference_log_probs(model, inputs)
        ratio = logps - per_sequence(reference_values, reference_sequences, count)
        kl_inputs = inputs["kl"]
        with torch.no_grad():
            kl_values, kl_sequences, _ = self._log_probs(model, kl_inputs)
            kl_reference, kl_reference_sequences, _ = self._reference_log_probs(model, kl_inputs)
            kl_logps = per_sequence(kl_values, kl_sequences, count)
            kl = (kl_logps - per_sequence(kl_reference, kl_reference_sequences, count)).mean()
            kl = self.accelerator.gather(kl[None]).mean().clamp(min=0)
        losses = torch.where(
            desirable,
            options.kto_chosen_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
            options.kto_rejected_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
        )
        rewards, tokens = beta * ratio.detach(), per_sequence(torch.ones_like(means), sequences, count)
        mean_logits = per_sequence(means, sequences, count)
        metrics = {"kl": kl}
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            metrics[f"rewards/{name}"] = (rewards[rows].sum(), rows.sum())
            metrics[f"logps/{name}"] = (logps.detach()[rows].sum(), rows.sum())
            metrics[f"logits/{name}"] = (mean_logits[rows].sum(), tokens[rows].sum())
        return self._with_router_loss(losses.mean(), router, metrics), metrics

    def logged_metrics(self, mode: str) -> dict:
        found = super().logged_metrics(mode)
        if "rewards/chosen" in found and "rewards/rejected" in found:
            found["rewards/margins"] = found["rewards/chosen"] - found["rewards/rejected"]
        return found


class RewardLoss(StageLoss):
    """--stage rm, as TRL's RewardTrainer: a sequence classifier's score of each answer's last token is its reward;
    the Bradley-Terry loss -log sigmoid(chosen - rejected - margin) (Llama 2's margin where the data gives one), and
    --center_rewards_coefficient times the mean squared reward. Both answers of every pair go through one forward,
    packed like the other stages."""

    def batch_loss(self, model, inputs) -> tuple[torch.Tensor, dict]:
        rewards = sequence_rewards(model, inputs).float()
        chosen, rejected = rewards[0::2], rewards[1::2]
        loss = -F.logsigmoid(chosen - rejected - inputs["margin"].to(rewards.device)).mean()
        if self.preference.center_rewards_coefficient:
            loss = loss + self.preference.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).detach().mean(),
            "mean_reward": rewards.detach().mean(),
            "min_reward": rewards.detach().min(),
            "max_reward": rewards.detach().max(),
        }
        return loss, metrics


def sequence_rewards(model, inputs: dict) -> torch.Tensor:
    """The score head's value at the last token of each sequence of a collated batch (packed or padded), as the
    sequence classifier pools one sequence: (sequences,)."""
    inputs = dict(inputs)
    index = inputs.pop("sequence_index")
    for key in ("labels", "margin", "reference_log_probs"):
        inputs.pop(key, None)
    head = score_head(model)
    seen = {}
    hook = head.register_forward_hook(lambda module, args, output: seen.update(scores=output))
    try:
        model(**inputs)
    finally:
        hook.remove()
    scores = seen["scores"].reshape(-1)  # (rows * tokens,): one label
    flat = index.reshape(-1)
    count = int(flat.max()) + 1
    positions = torch.arange(len(flat), device=flat.device)
    last = torch.full((count,), -1, dtype=torch.long, device=flat.device)
    last = last.scatter_reduce(0, flat.clamp(min=0), torch.where(flat >= 0, positions, -1), reduce="amax")
    return scores[last]


def score_head(model):
    """A sequence classifier's head ("score"), through PEFT's and the engines' wrappers."""
    for name, module in getattr(model, "module", model).named_modules():
        if name.rsplit(".", 1)[-1] == "score":
            return module
    raise ValueError(f"{type(model).__name__} has no score head: a reward model is a sequence classifier")


class PreferenceTrainer(PreferenceLoss, TokenBudgetBatches, LearningRatesByPart, NonFiniteGuard, LossScaleLog, Trainer):
    """--stage dpo: the stock Trainer with the SFT trainer's parts and the preference loss. Keyword arguments: the
    Trainer's, `preference` (PreferenceArguments), `reference` (Reference), `loss_impl`, `max_tokens_per_batch`,
    `lr_by_prefix`, `on_nonfinite`."""


class RewardTrainer(RewardLoss, TokenBudgetBatches, LearningRatesByPart, NonFiniteGuard, LossScaleLog, Trainer):
    """--stage rm: the stock Trainer with the SFT trainer's parts and the reward model's loss."""


class KTOTrainer(KTOLoss, TokenBudgetBatches, LearningRatesByPart, NonFiniteGuard, LossScaleLog, Trainer):
    """--stage kto: the stock Trainer with the SFT trainer's parts and KTO's loss."""


def frozen_copy(model):
    """The reference for full fine-tuning: the starting model, frozen, in evaluation mode."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference
