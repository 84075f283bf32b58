"""Token-budget batches: each step's packed batch is filled up to a number of tokens, not of samples.

With long-tailed data (most chats short, a few very long) a fixed number of samples per step makes memory swing
from step to step and lets one giant sample fill a step alone. Here samples are packed once, best-fit decreasing
within shuffled windows (as TRL packs): each batch holds at most `max_tokens` tokens (a single longer sample is
a batch of its own), and every epoch visits the batches in a new order. The loss is normalised over the
supervised tokens of the whole optimizer step (the Trainer's `num_items_in_batch`), so a step's gradient does not
depend on how its samples were split into batches.
"""

from __future__ import annotations

import random

from torch.utils.data import Sampler


class _Epoch:
    """Where accelerate's data loader looks for `set_epoch` (on `batch_sampler.sampler`)."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class TokenBudgetBatchSampler(Sampler[list[int]]):
    def __init__(self, lengths: list[int], max_tokens: int, seed: int = 0, window: int = 4096):
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.max_tokens, self.seed = max_tokens, seed
        self.sampler = _Epoch()
        self.batches = pack(lengths, max_tokens, random.Random(seed), window)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        order = list(range(len(self.batches)))
        random.Random(self.seed * 1000003 + self.sampler.epoch).shuffle(order)
        for i in order:
            yield list(self.batches[i])

    def __len__(self) -> int:
        return len(self.batches)


def pack(lengths: list[int], max_tokens: int, rng: random.Random, window: int) -> list[list[int]]:
    """Best-fit decreasing: within each shuffled window, the longest sample first, each into the fullest batch
    that still has room for it."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        bins: list[tuple[int, list[int]]] = []  # (tokens left, samples)
        for index in sorted(order[start : start + window], key=lambda i: -lengths[i]):
            fitting = [b for b, (left, _) in enumerate(bins) if left >= lengths[index]]
            if fitting:
                best = min(fitting, key=lambda b: bins[b][0])
                left, members = bins[best]
                bins[best] = (left - lengths[index], [*members, index])
            else:
                bins.append((max_tokens - lengths[index], [index]))
        batches += [members for _, members in bins]
    return batches
