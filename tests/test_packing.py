"""Padding-free batches: the flattened loss equals the padded loss, for the text and the VL model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from tests.helpers import encoder_for, seed_features
from tuning.data.collate import FlatteningCollator, PaddingCollator
from tuning.families import packed_positions
from tuning.model import set_use_cache


def losses(model, features, pad_id, positions=None) -> tuple[float, float]:
    set_use_cache(model, False)  # a cache object hides the packed-sequence boundaries
    padded = PaddingCollator(pad_id)(features)
    flat = FlatteningCollator(positions)(features)
    with torch.no_grad():
        return float(model(**padded).loss), float(model(**flat).loss)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_text_packed_loss_equals_padded_loss(tiny_text, text_processing, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_text, attn_implementation=attention).eval()
    batch = seed_features(text_processing, ["example_chatml.jsonl", "example_pretrain.jsonl"])
    padded, flat = losses(model, batch, text_processing[0].pad_token_id)
    assert abs(padded - flat) < 1e-4


def test_vl_packed_loss_equals_padded_loss_with_several_images(tiny_vl, vl_processing):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl).eval()
    batch = seed_features(vl_processing, ["example.json", "example_openai.jsonl"])  # 0, 1 and 2 images per sample
    assert sorted(len(f["image_grid_thw"]) for f in batch if "image_grid_thw" in f) == [1, 1, 1, 2]
    padded, flat = losses(model, batch, vl_processing[0].pad_token_id, packed_positions(model))
    assert abs(padded - flat) < 1e-4


def test_the_equality_test_can_fail(tiny_text, text_processing):
    """Positions that do not restart let samples attend to each other: the losses then differ."""
    model = AutoModelForCausalLM.from_pretrained(tiny_text).eval()
    set_use_cache(model, False)
    batch = seed_features(text_processing, ["example_chatml.jsonl"])
    flat = FlatteningCollator()(batch)
    flat["position_ids"] = torch.arange(flat["input_ids"].shape[1]).unsqueeze(0)
    with torch.no_grad():
        padded = float(model(**PaddingCollator(text_processing[0].pad_token_id)(batch)).loss)
        assert abs(padded - float(model(**flat).loss)) > 1e-3


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen3-vl"])
def test_other_vl_families_pack_exactly_too(kind):
    from tuning.data.processing import load_processing
    from tuning.tiny import ensure_tiny

    folder = ensure_tiny(kind)
    processing = load_processing(str(folder))
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    batch = seed_features(processing, ["example.json", "example_openai.jsonl"])
    padded, flat = losses(model, batch, processing[0].pad_token_id, packed_positions(model))
    assert abs(padded - flat) < 1e-4


def test_the_placeholder_picture_changes_no_loss(tiny_vl, vl_processing):
    """Added to picture-less batches so every rank's projector has a gradient; it must not move the loss."""
    from tuning.data.dataset import sample_to_features

    model = AutoModelForImageTextToText.from_pretrained(tiny_vl).eval()
    set_use_cache(model, False)
    text_only = [
        f for f in seed_features(vl_processing, ["example.json", "example_chatml.jsonl"]) if "pixel_values" not in f
    ]
    placeholder = sample_to_features(encoder_for(vl_processing).placeholder_image_sample())
    plain = FlatteningCollator(packed_positions(model))(text_only)
    padded_out = FlatteningCollator(packed_positions(model), placeholder=placeholder)(text_only)
    assert "pixel_values" in padded_out and "pixel_values" not in plain
    with torch.no_grad():
        assert abs(float(model(**plain).loss) - float(model(**padded_out).loss)) < 1e-5
