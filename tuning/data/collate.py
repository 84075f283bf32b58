"""Batching: dynamic padding, and padding-free flattening for packed training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tuning.data.encode import IGNORE_INDEX, first_supervised

# what a sample's features hold besides its pictures' and videos' (which are whatever the processor returns)
TEXT_KEYS = ("input_ids", "labels", "mm_token_type_ids", "second_per_grid_ts")
TOKEN_TYPES = "mm_token_type_ids"


# features with a row per token of their sample (Mllama's cross-attention mask): padded to the batch's length
PER_TOKEN = ("cross_attention_mask",)


def _stack_media(features: list[dict], batch: dict, rows_per_sample: bool = False) -> None:
    """Pictures and videos of the batch, in sample order (the model matches them to their tokens in order):
    each feature of the processor joined along its first dimension (pictures, tiles, patches or, for a
    processor that returns one row per sample, samples), padded at the end of every other dimension where the
    samples differ (a processor pads its own batch the same way: Pixtral's sizes, LLaVA-OneVision's patches,
    Idefics3's pictures per sample, which the model then drops as empty). `rows_per_sample`: every sample has its
    row, zeros for one without pictures (Idefics3 drops all-zero tiles; Mllama's zero mask attends to nothing)."""
    keys = dict.fromkeys(k for f in features for k, v in f.items() if k not in TEXT_KEYS and v is not None)
    length = batch["input_ids"].shape[1]
    for key in keys:
        found = [torch.as_tensor(f[key]) if f.get(key) is not None else None for f in features]
        if key in PER_TOKEN:
            found = [t if t is None else _padded_to(t, 1, length) for t in found]
        if not rows_per_sample:
            batch[key] = _joined([t for t in found if t is not None])
            continue
        example = next(t for t in found if t is not None)
        rows = [t if t is not None else torch.zeros((1, *example.shape[1:]), dtype=example.dtype) for t in found]
        batch[key] = _joined(rows)
    times = [t for f in features for t in f.get("second_per_grid_ts") or []]
    if times:
        batch["second_per_grid_ts"] = torch.tensor(times)


def _padded_to(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    pads = [0, 0] * (tensor.dim() - dim - 1) + [0, size - tensor.shape[dim]]
    return torch.nn.functional.pad(tensor, pads)


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    if len({t.shape[1:] for t in tensors}) == 1:
        return torch.cat(tensors)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pads = [p for d in reversed(range(1, t.dim())) for p in (0, shape[d - 1] - t.shape[d])]
        padded.append(torch.nn.functional.pad(t, pads))
    return torch.cat(padded)


def _has_media(feature: dict) -> bool:
    return any(k not in TEXT_KEYS and v is not None for k, v in feature.items())


def _token_types(batch: dict, name: str | None) -> None:
    """The picture-token types under the name the model takes them by, or none where it takes none."""
    types = batch.pop(TOKEN_TYPES, None)
    if name is not None and types is not None:
        batch[name] = types


@dataclass
class PaddingCollator:
    """Pads each batch to its own longest sample (right side); labels pad with -100."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    token_types: str | None = TOKEN_TYPES  # the model input that marks picture tokens (MediaProcessor)
    rows_per_sample: bool = False  # the family's picture features have a row per sample (tuning.families)

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def pad(key: str, value: int) -> torch.Tensor:
            rows = [list(f.get(key) or [0] * len(f["input_ids"])) for f in features]
            return torch.tensor([row + [value] * (longest - len(row)) for row in rows], dtype=torch.long)

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "labels": pad("labels", IGNORE_INDEX),
            "attention_mask": torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"])) for f in features]
            ),
        }
        if any(f.get(TOKEN_TYPES) is not None for f in features):
            batch[TOKEN_TYPES] = pad(TOKEN_TYPES, 0)
        _token_types(batch, self.token_types)
        _stack_media(features, batch, self.rows_per_sample)
        return batch


@dataclass
class FlatteningCollator:
    """Concatenates a batch into one row with per-sample position_ids, so no sample attends to another.

    Transformers builds a block-diagonal mask from the restarting positions (flash-attention varlen on
    GPU, sdpa/eager on CPU with use_cache=False). The first label of every sample is -100: it would
    otherwise be predicted from the previous sample's last token. `positions` is the model family's own position
    function for packed rows (tuning.families.packed_positions: Qwen-VL's 3-D rope positions), or None for 1-D
    positions restarting at every sample (the pictures' features then go in by their tokens alone).
    """

    positions: Callable[[list[dict]], torch.Tensor] | None = None
    # one blank picture and no labels, added to picture-less batches (Encoder.placeholder_image_sample)
    placeholder: dict | None = None
    token_types: str | None = TOKEN_TYPES
    rows_per_sample: bool = False

    def __call__(self, features: list[dict]) -> dict:
        if self.placeholder is not None and not any(_has_media(f) for f in features):
            features = [*features, self.placeholder]
        input_ids, labels, positions = [], [], []
        for f in features:
            input_ids += f["input_ids"]
            labels += [IGNORE_INDEX, *f["labels"][1:]]
            positions += range(len(f["input_ids"]))
        batch = {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels])}
        batch["position_ids"] = torch.tensor([positions]) if self.positions is None else self.positions(features)
        if self.positions is not None or any(_has_media(f) for f in features):
            batch[TOKEN_TYPES] = torch.tensor([[t for f in features for t in self._token_types(f)]])
            _token_types(batch, self.token_types)
            _stack_media(features, batch, self.rows_per_sample)
        return batch

    @staticmethod
    def _token_types(feature: dict) -> list[int]:
        return feature.get("mm_token_type_ids") or [0] * len(feature["input_ids"])


@dataclass
class PairCollator:
    """Preference pairs through one forward: every pair's chosen and rejected sequence, in that order, collated by
    `inner` (padding-free packed, or padded, as for SFT). Adds `sequence_index`, shaped as `labels`: which sequence
    (2i chosen, 2i+1 rejected of pair i) each token belongs to, -1 for none (padding, a placeholder picture);
    `margin` per pair; `reference_log_probs` (pairs, 2) where the dataset holds them precomputed."""

    inner: Callable[[list[dict]], dict]

    def __call__(self, pairs: list[dict]) -> dict:
        sequences = [side for pair in pairs for side in (pair["chosen"], pair["rejected"])]
        batch = self.inner(sequences)
        batch["sequence_index"] = sequence_index(batch["labels"], [len(s["input_ids"]) for s in sequences])
        batch["margin"] = torch.tensor([pair["margin"] for pair in pairs], dtype=torch.float32)
        if pairs and all(pair.get("same_pictures") for pair in pairs):
            # the chosen answers' pictures alone, for one pass of the tower a pair (tuning.preference.shared_pictures)
            chosen = {"input_ids": batch["input_ids"]}
            _stack_media([pair["chosen"] for pair in pairs], chosen, getattr(self.inner, "rows_per_sample", False))
            chosen.pop("input_ids")
            batch["pair_pictures"] = chosen
            batch["pictures_per_pair"] = torch.tensor([pair["pictures"] for pair in pairs])
        if all("reference" in pair for pair in pairs):
            batch["reference_log_probs"] = torch.tensor([pair["reference"] for pair in pairs], dtype=torch.float32)
        return batch


@dataclass
class UnpairedCollator:
    """KTO's batches: each completion as a sequence (`inner` collates them as for SFT), with `desirable` per
    sequence and, under `kl`, the batch's mismatched sequences that estimate the KL term as TRL's KTOTrainer does:
    the prompt of sequence i with the completion of sequence i - 1 (the first takes the last one's)."""

    inner: Callable[[list[dict]], dict]

    def __call__(self, examples: list[dict]) -> dict:
        sequences = [example["completion"] for example in examples]
        batch = self.inner(sequences)
        batch["sequence_index"] = sequence_index(batch["labels"], [len(s["input_ids"]) for s in sequences])
        batch["desirable"] = torch.tensor([example["label"] for example in examples])
        mismatched = [_with_completion(s, sequences[i - 1]) for i, s in enumerate(sequences)]
        kl = self.inner(mismatched)
        kl["sequence_index"] = sequence_index(kl["labels"], [len(s["input_ids"]) for s in mismatched])
        batch["kl"] = kl
        return batch


def _with_completion(prompt: dict, completion: dict) -> dict:
    """`prompt`'s context (and pictures) followed by `completion`'s answer."""
    start, answer_start = first_supervised(prompt["labels"]), first_supervised(completion["labels"])
    answer = list(completion["input_ids"][answer_start:])
    out = {k: v for k, v in prompt.items() if k not in ("input_ids", "labels", TOKEN_TYPES)}
    out["input_ids"] = list(prompt["input_ids"][:start]) + answer
    out["labels"] = [IGNORE_INDEX] * start + list(completion["labels"][answer_start:])
    if prompt.get(TOKEN_TYPES) is not None:
        out[TOKEN_TYPES] = list(prompt[TOKEN_TYPES][:start]) + [0] * len(answer)
    for key in PER_TOKEN:  # a row per token (Mllama's mask): the answer sees what the prompt's last token sees
        if out.get(key) is not None:
            rows = torch.as_tensor(out[key])[:, :start]
            out[key] = torch.cat([rows, rows[:, -1:].expand(-1, len(answer), *rows.shape[2:])], dim=1)
    return out


def sequence_index(labels: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """For each token of a collated batch, the number of the sequence it belongs to (-1: none). A batch of one row
    holding several sequences is packed (end to end, then anything appended after them); else row i is sequence i,
    padded at its end."""
    index = torch.full_like(labels, -1)
    if labels.shape[0] == 1 and len(lengths) > 1:
        packed = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        index[0, : len(packed)] = packed
        return index
    for row, length in enumerate(lengths):
        index[row, :length] = row
    return index
