"""The training loss from the final hidden states: supervised positions only, in chunks, never the full logits.

On a real Qwen vocabulary (151,936) the logits are the largest thing in memory: a packed batch of T tokens
holds T x 151,936 of them, plus their gradient and float copies, although most positions (system, user,
picture tokens) have no label. Here the model is asked for its hidden states at the supervised positions only
(`logits_to_keep`), and the output head is applied to them a chunk of rows at a time, in float32: each chunk's
logits give its share of the loss and, at once, its share of the gradients with respect to the hidden states
and the head's weight, then are dropped. The result equals the stock loss (tested to 1e-5 with its gradients).

It runs inside the model's own forward, as the output head's forward: the head's weight is there however the
engine shards it (DeepSpeed ZeRO-3 gathers it, FSDP unshards it), the loss is the head's output (so the engines'
backward hooks gather the weight again while its gradient is made), and the gradients reach the weight through
autograd, where the engines expect them.

Some models change the logits between the head and their loss (a soft cap, a scale), as their config says
(`logit_transform`): the chunks apply the same change, and the model's own change never touches the loss, which
is taken as the head returned it. The head also returns a few fixed probe values beside the loss, and what the
model's forward makes of them is compared with the change the chunks applied: a model that changes its logits
in a way its config does not say is caught at its first step (LogitTransformMismatch), never trained wrong.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from tuning.data.encode import IGNORE_INDEX

LOSS_IMPLEMENTATIONS = ("chunked", "plain")
# float32 logits alive at once: 138 rows of Qwen's 151,936. Measured on a 2-core CPU (1,500 rows, hidden 896): 128
# rows as fast as 256 and half the memory, 64 rows 37 % slower
CHUNK_BYTES = 80 * 2**20
MIN_CHUNK_ROWS = 32

# Config attributes (of the text config, else the model's) by which transformers' models change the head's logits
# before their loss: multiplied by, divided by, then soft-capped at (cap * tanh(logits / cap)).
MULTIPLIERS = ("logit_scale", "lm_head_multiplier", "output_multiplier")
DIVISORS = ("logits_scaling",)
SOFT_CAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# Config attributes that, when set, add to the model's loss what the supervised positions' summed loss cannot give.
UNREPRODUCIBLE = {
    "z_loss_coefficient": "a z-loss over the logits of every position",
    "unpadded_vocab_size": "a vocabulary cut below the head's size before the loss",
}
# Logit values the head returns beside the loss: what the model's forward makes of them shows its transform. Within
# and beyond the usual soft caps (30, 50), so that neither a scale nor a cap hides behind saturation.
PROBES = (-60.0, -4.0, 0.5, 3.0, 20.0, 45.0)


def chunk_rows(vocab_size: int, buffers: int = 1) -> int:
    """Rows of logits per chunk: as many as CHUNK_BYTES hold of `buffers` float32 logits each, at least
    MIN_CHUNK_ROWS."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab_size * buffers))


class UnsupportedLoss(ValueError):
    """The model's own loss is something the chunked loss cannot reproduce: the message says what."""


class LogitTransformMismatch(UnsupportedLoss):
    """The model's forward changed the head's output otherwise than its config says."""


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to the head's logits before its loss: times `scale`, then soft-capped at `cap`."""

    scale: float = 1.0
    cap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits * self.scale
        return logits if self.cap is None else torch.tanh(logits / self.cap) * self.cap

    def apply_(self, logits: torch.Tensor) -> torch.Tensor | float:
        """The transform in place; returns its derivative (a tensor like `logits`, or a number)."""
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.cap is None:
            return self.scale
        capped = logits.div_(self.cap).tanh_()
        derivative = (1 - capped.square()).mul_(self.scale)  # d(cap * tanh(s x / cap))/dx, a second buffer
        capped.mul_(self.cap)
        return derivative

    def __str__(self) -> str:
        parts = [f"times {self.scale:g}"] if self.scale != 1.0 else []
        return " then ".join(parts + ([f"soft-capped at {self.cap:g}"] if self.cap is not None else [])) or "none"


def logit_transform(config) -> LogitTransform:
    """The transform a model's config says its forward applies to the head's logits before the loss. Raises
    UnsupportedLoss where the config adds to the loss what the chunks cannot reproduce."""

    def value(name: str):
        for source in (config.get_text_config(), config):
            if getattr(source, name, None) is not None:
                return name, getattr(source, name)
        return None

    for name, why in UNREPRODUCIBLE.items():
        if (found := value(name)) and found[1]:
            raise UnsupportedLoss(f"its config's {name} ({found[1]}) means {why}")
    scale = math.prod(found[1] for name in MULTIPLIERS if (found := value(name)))
    scale /= math.prod(found[1] for name in DIVISORS if (found := value(name)))
    caps = [found for name in SOFT_CAPS if (found := value(name))]
    if len(caps) > 1:
        raise UnsupportedLoss(f"its config has soft caps {caps}: which applies when is not known")
    return LogitTransform(float(scale), float(caps[0][1]) if caps else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross-entropy(transform(hidden @ weight.T + bias), target), gradients computed chunk by
    chunk in the forward pass (so no logits are kept for the backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, transform: LogitTransform):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            rows = hidden[start : start + chunk]
            target = targets[start : start + chunk]
            logits = nn.functional.linear(rows, weight, bias).float()  # as the stock head, then upcast as its loss
            derivative = transform.apply_(logits)  # the model's own change of its logits, in float32
            # the loss and d(loss)/d(logits) = softmax - one-hot, all in the logits' own memory: one chunk alive
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            target_logits = logits.gather(1, target[:, None]).squeeze(1)
            norms = logits.exp_().sum(dim=-1)
            total += (norms.log() - target_logits).sum()
            grad_logits = logits.div_(norms[:, None])
            grad_logits[torch.arange(len(target), device=target.device), target] -= 1
            if not (isinstance(derivative, float) and derivative == 1.0):
                grad_logits.mul_(derivative)  # the chain rule through the transform
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ rows.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del logits, grad_logits, derivative  # else this chunk's logits stay alive while the next chunk's are made
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy_sum(
    hidden, head: nn.Module, targets, chunk: int | None = None, transform: LogitTransform = LogitTransform()
) -> torch.Tensor:
    """The summed cross-entropy of the output head applied to `hidden` (rows, hidden size), then `transform`,
    against `targets`, `chunk` rows of logits at a time (default: chunk_rows of the vocabulary)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    chunk = chunk or chunk_rows(head.out_features, buffers=1 if transform.cap is None else 2)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, transform)


def output_head(model: nn.Module) -> nn.Linear | None:
    """The plain linear output head (lm_head), through PEFT and engine wrappers; None where the head is wrapped
    (LoRA on lm_head, trainable token rows of a tied head, a quantized head): the stock loss then runs."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    head = inner.get_output_embeddings()
    return head if type(head) is nn.Linear else None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the chunked loss cannot be this model's own loss, or None where it can."""
    if output_head(model) is None:
        return "the output head is not a plain linear layer (LoRA or trainable tokens on it, or quantized)"
    try:
        logit_transform(getattr(model, "module", model).config)
    except UnsupportedLoss as e:
        return str(e)
    return None


@contextlib.contextmanager
def supervised_loss(model: nn.Module, labels: torch.Tensor, chunk: int | None = None):
    """For one forward of the model with `logits_to_keep=keep` (the value this yields): the output head, given the
    hidden states at the supervised positions, returns their summed loss, and the model's output carries it as its
    `logits` (shape (1, 1)). Raises UnsupportedLoss before, or LogitTransformMismatch after that forward where the
    model's own loss is something else.

    The head is still called as a module, so an engine's hooks see the loss as its output: DeepSpeed ZeRO-3 gathers
    the weight for the forward and again for the backward, where this loss's gradients reach it; FSDP unshards it."""

    def summed_loss(hidden, head, targets, transform):
        return linear_cross_entropy_sum(hidden, head, targets, chunk, transform).view(1, 1)

    with _head_computes(model, labels, summed_loss) as keep:
        yield keep


@contextlib.contextmanager
def token_log_probs(model: nn.Module, labels: torch.Tensor, chunk: int | None = None):
    """As supervised_loss, for the preference losses: the model's `logits` (shape (1, 2 * kept)) carry, for each
    supervised position in the order `labels[:, 1:]` flattens them, the log-probability of its label, then the mean
    of its logits (no gradient; TRL logs it as logits/chosen and logits/rejected). Gradients flow from the
    log-probabilities to the hidden states and the head; each chunk's logits are computed again in the backward, as
    no loss (and so no gradient) is known in the forward."""

    def log_probs(hidden, head, targets, transform):
        weight, bias = head.weight, getattr(head, "bias", None)
        rows = chunk or chunk_rows(head.out_features, buffers=1 if transform.cap is None else 2)
        values, means = _LinearTokenLogProbs.apply(hidden, weight, bias, targets, rows, transform)
        return torch.cat([values, means]).view(1, -1)

    with _head_computes(model, labels, log_probs) as keep:
        yield keep


class _LinearTokenLogProbs(torch.autograd.Function):
    """log softmax(transform(hidden @ weight.T + bias))[target] of each row, and the mean logit, a chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, transform: LogitTransform):
        values = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        means = torch.empty_like(values)
        for start in range(0, hidden.shape[0], chunk):
            logits = nn.functional.linear(hidden[start : start + chunk], weight, bias).float()
            transform.apply_(logits)
            target = targets[start : start + chunk]
            means[start : start + chunk] = logits.mean(-1)
            top = logits.amax(dim=-1, keepdim=True)
            chosen = logits.gather(1, target[:, None]).squeeze(1) - top.squeeze(1)
            values[start : start + chunk] = chosen - logits.sub_(top).exp_().sum(-1).log()  # in the logits' memory
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.transform = chunk, transform
        ctx.mark_non_differentiable(means)
        return values, means

    @staticmethod
    def backward(ctx, grad_values, _grad_means):
        hidden, weight, bias, targets = ctx.saved_tensors
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows, target = hidden[start : start + ctx.chunk], targets[start : start + ctx.chunk]
            upstream = grad_values[start : start + ctx.chunk].float()
            logits = nn.functional.linear(rows, weight, bias).float()
            derivative = ctx.transform.apply_(logits)
            # d log p(target) / d logits = one-hot - softmax, times the upstream gradient of each row; the softmax in
            # the logits' own memory, so one chunk of them is alive (two with a soft cap's derivative)
            logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
            grad_logits = logits.div_(logits.sum(dim=-1, keepdim=True)).mul_(-upstream[:, None])
            grad_logits[torch.arange(len(target), device=target.device), target] += upstream
            if not (isinstance(derivative, float) and derivative == 1.0):
                grad_logits.mul_(derivative)
            del logits, derivative
            if grad_hidden is not None:
                grad_hidden[start : start + ctx.chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ rows.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


@contextlib.contextmanager
def _head_computes(model: nn.Module, labels: torch.Tensor, compute):
    """The output head, for one forward with `logits_to_keep=keep` (yielded), returns `compute(hidden at the
    supervised positions, head, their targets, the config's logit transform)`, a (1, n) tensor, and the model's
    output carries it as its `logits`: what the model's forward does to it is checked against the transform by
    probe values returned beside it."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]  # in the order the model flattens the kept positions
    if (why := unsupported_reason(model)) is not None:
        raise UnsupportedLoss(why)
    inner, head = getattr(model, "module", model), output_head(model)
    transform = logit_transform(inner.config)
    seen: dict = {}

    def computed(hidden):  # (kept positions, hidden size) -> (1, n + probes)
        values = compute(hidden, head, targets, transform)
        seen["width"] = values.shape[1]
        return torch.cat([values, values.new_tensor(PROBES)[None]], dim=1)

    def head_returned(module, args, output):  # registered last: the output after the engines' hooks
        seen["head"] = output

    def model_returned(module, args, output):  # the values as the head returned them, if the probes say they may be
        carried, logits, width = seen.pop("head", None), getattr(output, "logits", None), seen.get("width", 0)
        if carried is None or logits is None or logits.shape != carried.shape:
            seen["problem"] = "its forward returned no logits of the head's output shape"
            return
        expected, got = transform(carried[:, width:].detach()), logits[:, width:].detach().float()
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
            seen["problem"] = (
                f"its forward changes the head's logits {list(PROBES)} into {got.flatten().tolist()}, not as its "
                f"config says (transform: {transform})"
            )
            return
        values = logits[:, :width]
        if transform != LogitTransform():  # the values as the head returned them, not the model's change of them;
            values = carried[:, :width] + 0 * values  # the model's output stays in the graph, for engines' hooks
        output["logits"] = values

    head.forward = computed  # the instance attribute shadows nn.Linear.forward; __call__ and its hooks still run
    hooks = [head.register_forward_hook(head_returned), inner.register_forward_hook(model_returned)]
    try:
        yield keep
        if "problem" in seen:
            raise LogitTransformMismatch(seen["problem"])
    finally:
        del head.forward
        for hook in hooks:
            hook.remove()


# Config attributes weighting an MoE router's load-balancing loss in the model's own loss, which its forward adds when
# asked for the router logits (output_router_logits).
ROUTER_LOSS_WEIGHTS = ("router_aux_loss_coef", "aux_loss_coef")


def set_router_loss_weight(model: nn.Module, weight: float | None = None) -> float | None:
    """The weight of an MoE model's router load-balancing loss: `weight` (None: the model's own), written into its
    configs and into the modules that copied it at init, so that its forward (asked with output_router_logits=True)
    and the chunked loss (adding `weight * outputs.aux_loss`) add the same term. None for a model without such a
    loss, a forward that cannot be asked for it, or weight 0."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # under PEFT
    configs = list({id(c): c for c in (inner.config, inner.config.get_text_config())}.values())
    in_configs = [(c, n) for c in configs for n in ROUTER_LOSS_WEIGHTS if _is_number(getattr(c, n, None))]
    if not in_configs or "output_router_logits" not in inspect.signature(base.forward).parameters:
        return None
    # the forward reads self.router_aux_loss_coef, copied from the config at init (or the config's, at each call)
    copies = [(m, n) for m in inner.modules() for n in ROUTER_LOSS_WEIGHTS if _is_number(vars(m).get(n))]
    if weight is None:
        owner, name = (copies or in_configs)[0]
        weight = getattr(owner, name)
    for owner, name in in_configs + copies:
        setattr(owner, name, weight)
    return weight or None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
