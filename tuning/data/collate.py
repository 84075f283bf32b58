"""Batching: dynamic padding, and padding-free flattening for packed training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tuning.data.encode import IGNORE_INDEX

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _stack_media(features: list[dict], batch: dict) -> None:
    """Pictures and videos of the batch, in sample order (the model matches them to their tokens in order)."""
    for key in MEDIA_KEYS:
        found = [f[key] for f in features if f.get(key) is not None]
        if found:
            batch[key] = torch.cat(found)
    times = [t for f in features for t in f.get("second_per_grid_ts") or []]
    if times:
        batch["second_per_grid_ts"] = torch.tensor(times)


def _has_media(feature: dict) -> bool:
    return feature.get("pixel_values") is not None or feature.get("pixel_values_videos") is not None


@dataclass
class PaddingCollator:
    """Pads each batch to its own longest sample (right side); labels pad with -100."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

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
        if any(f.get("mm_token_type_ids") is not None for f in features):
            batch["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
        _stack_media(features, batch)
        return batch


@dataclass
class FlatteningCollator:
    """Concatenates a batch into one row with per-sample position_ids, so no sample attends to another.

    Transformers builds a block-diagonal mask from the restarting positions (flash-attention varlen on
    GPU, sdpa/eager on CPU with use_cache=False). The first label of every sample is -100: it would
    otherwise be predicted from the previous sample's last token. `positions` is the model family's own position
    function for packed rows (tuning.families.packed_positions: Qwen-VL's 3-D rope positions), or None for 1-D
    positions restarting at every sample.
    """

    positions: Callable[[list[dict]], torch.Tensor] | None = None
    # one blank picture and no labels, added to picture-less batches (Encoder.placeholder_image_sample)
    placeholder: dict | None = None

    def __call__(self, features: list[dict]) -> dict:
        if self.placeholder is not None and not any(_has_media(f) for f in features):
            features = [*features, self.placeholder]
        input_ids, labels, positions = [], [], []
        for f in features:
            input_ids += f["input_ids"]
            labels += [IGNORE_INDEX, *f["labels"][1:]]
            positions += range(len(f["input_ids"]))
        batch = {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels])}
        if self.positions is None:
            if any(_has_media(f) for f in features):
                raise ValueError("pictures and videos need the model family's positions to be flattened: pass them")
            batch["position_ids"] = torch.tensor([positions])
            return batch
        batch["position_ids"] = self.positions(features)
        batch["mm_token_type_ids"] = torch.tensor([[t for f in features for t in self._token_types(f)]])
        _stack_media(features, batch)
        return batch

    @staticmethod
    def _token_types(feature: dict) -> list[int]:
        return feature.get("mm_token_type_ids") or [0] * len(feature["input_ids"])
