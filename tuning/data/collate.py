"""Batching: dynamic padding, and padding-free flattening for packed training."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuning.data.encode import IGNORE_INDEX


def _stack_images(features: list[dict], batch: dict) -> None:
    with_images = [f for f in features if f.get("pixel_values") is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([f["pixel_values"] for f in with_images])
        batch["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in with_images])


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
        _stack_images(features, batch)
        return batch


@dataclass
class FlatteningCollator:
    """Concatenates a batch into one row with per-sample position_ids, so no sample attends to another.

    Transformers builds a block-diagonal mask from the restarting positions (flash-attention varlen on
    GPU, sdpa/eager on CPU with use_cache=False). The first label of every sample is -100: it would
    otherwise be predicted from the previous sample's last token.
    """

    def __call__(self, features: list[dict]) -> dict:
        if any(f.get("pixel_values") is not None for f in features):
            raise ValueError("FlatteningCollator handles text samples; use PaddingCollator for images")
        input_ids, labels, positions = [], [], []
        for f in features:
            input_ids += f["input_ids"]
            labels += [IGNORE_INDEX, *f["labels"][1:]]
            positions += range(len(f["input_ids"]))
        return {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
        }
