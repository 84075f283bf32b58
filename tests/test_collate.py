"""Collators: dynamic padding per batch, and flattening with per-sample positions."""

from __future__ import annotations

import torch

from tuning.data.collate import FlatteningCollator, PaddingCollator


def test_padding_collator_pads_to_the_batch_longest():
    batch = PaddingCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8], "labels": [8]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_padding_collator_stacks_images_and_pads_token_types():
    pixels = torch.ones(4, 3)
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)(
        [
            {
                "input_ids": [1, 9, 2],
                "labels": [-100, -100, 2],
                "pixel_values": pixels,
                "image_grid_thw": torch.tensor([[1, 2, 2]]),
                "mm_token_type_ids": [0, 1, 0],
            },
            {"input_ids": [3], "labels": [3]},
        ]
    )
    assert batch["input_ids"].shape == (2, 4)
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]
    assert batch["pixel_values"].shape == (4, 3) and batch["image_grid_thw"].tolist() == [[1, 2, 2]]


def test_flattening_restarts_positions_and_masks_each_first_label():
    batch = FlatteningCollator()(
        [
            {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
            {"input_ids": [8, 9], "labels": [8, 9]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
