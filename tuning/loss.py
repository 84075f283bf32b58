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
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tuning.data.encode import IGNORE_INDEX

LOSS_IMPLEMENTATIONS = ("chunked", "plain")
# float32 logits alive at once: 138 rows of Qwen's 151,936. Measured on a 2-core CPU (1,500 rows, hidden 896): 128
# rows as fast as 256 and half the memory, 64 rows 37 % slower
CHUNK_BYTES = 80 * 2**20
MIN_CHUNK_ROWS = 32


def chunk_rows(vocab_size: int) -> int:
    """Rows of logits per chunk: as many as CHUNK_BYTES of float32 logits hold, at least MIN_CHUNK_ROWS."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross-entropy(hidden @ weight.T + bias, target), gradients computed chunk by chunk in the
    forward pass (so no logits are kept for the backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            rows = hidden[start : start + chunk]
            target = targets[start : start + chunk]
            logits = nn.functional.linear(rows, weight, bias).float()  # as the stock head, then upcast as its loss
            # the loss and d(loss)/d(logits) = softmax - one-hot, all in the logits' own memory: one chunk alive
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            target_logits = logits.gather(1, target[:, None]).squeeze(1)
            norms = logits.exp_().sum(dim=-1)
            total += (norms.log() - target_logits).sum()
            grad_logits = logits.div_(norms[:, None])
            grad_logits[torch.arange(len(target), device=target.device), target] -= 1
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ rows.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del logits, grad_logits  # else this chunk's logits stay alive while the next chunk's are made
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
        )


def linear_cross_entropy_sum(hidden, head: nn.Module, targets, chunk: int | None = None) -> torch.Tensor:
    """The summed cross-entropy of the output head applied to `hidden` (rows, hidden size) against `targets`,
    `chunk` rows of logits at a time (default: chunk_rows of the vocabulary)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk or chunk_rows(head.out_features))


def output_head(model: nn.Module) -> nn.Linear | None:
    """The plain linear output head (lm_head), through PEFT and engine wrappers; None where the head is wrapped
    (LoRA on lm_head, trainable token rows of a tied head, a quantized head): the stock loss then runs."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    head = inner.get_output_embeddings()
    return head if type(head) is nn.Linear else None


@contextlib.contextmanager
def supervised_loss(model: nn.Module, labels: torch.Tensor, chunk: int | None = None):
    """For one forward of the model with `logits_to_keep=keep` (the value this yields): the output head, given the
    hidden states at the supervised positions, returns their summed loss (shape (1, 1)) instead of logits.

    The head is still called as a module, so an engine's hooks see the loss as its output: DeepSpeed ZeRO-3 gathers
    the weight for the forward and again for the backward, where this loss's gradients reach it; FSDP unshards it."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]  # in the order the model flattens the kept positions
    head = output_head(model)
    if head is None:
        raise ValueError("the output head is not a plain linear layer")

    def summed_loss(hidden):  # (kept positions, hidden size) -> (1, 1)
        return linear_cross_entropy_sum(hidden, head, targets, chunk).view(1, 1)

    head.forward = summed_loss  # the instance attribute shadows nn.Linear.forward; __call__ and its hooks still run
    try:
        yield keep
    finally:
        del head.forward
