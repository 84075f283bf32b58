"""The tiny offline models: deterministic, loadable like hub checkpoints, real architectures that train."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from tuning.tiny import SPECIAL_TOKENS, TinySpec, build, ensure_tiny

VL_KINDS = ["vl", "qwen2-vl", "qwen3-vl"]
EXPECTED_CLASS = {
    "vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen3-vl": "Qwen3VLForConditionalGeneration",
}


def test_build_is_byte_identical(tmp_path):
    first, second = build(TinySpec(kind="vl"), tmp_path / "a"), build(TinySpec(kind="vl"), tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_ensure_tiny_reuses_a_current_build(tmp_path):
    folder = ensure_tiny("text", tmp_path / "m")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    ensure_tiny("text", tmp_path / "m")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # A different spec is a different build: the stale folder is replaced.
    ensure_tiny("text", tmp_path / "m", hidden_size=32)
    assert AutoModelForCausalLM.from_pretrained(folder).config.hidden_size == 32


def test_tokenizer_has_qwen_special_tokens_as_single_ids(tiny_text):
    tokenizer = AutoTokenizer.from_pretrained(tiny_text)
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [token]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # Byte-level BPE: any text round-trips, Chinese included.
    text = "你好, world! 图中的狗 ☃"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_text_model_loads_and_is_small(tiny_text):
    model = AutoModelForCausalLM.from_pretrained(tiny_text)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    tokenizer = AutoTokenizer.from_pretrained(tiny_text)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_has_qwen25vl_layout(tiny_vl):
    processor = AutoProcessor.from_pretrained(tiny_vl)
    image = Image.new("RGB", (64, 48), "red")
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Red."},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_vision_id=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
    )
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    pads = int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert pads == int(inputs["image_grid_thw"].prod()) // 4  # merge 2x2 patches into one token


@pytest.mark.parametrize("kind", VL_KINDS)
def test_vl_model_forward_backward_with_an_image(kind):
    folder = ensure_tiny(kind)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == EXPECTED_CLASS[kind]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (80, 60), "blue")},
                {"type": "text", "text": "colour?"},
            ],
        },
        {"role": "assistant", "content": "blue"},
    ]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    vision_grads = [p.grad for n, p in model.named_parameters() if "visual" in n and p.grad is not None]
    assert vision_grads and any(g.abs().sum() > 0 for g in vision_grads), "no gradient reached the vision tower"
    # The picture matters: another image gives other logits.
    other = dict(inputs)
    other_image = processor.image_processor(images=[Image.new("RGB", (80, 60), "yellow")], return_tensors="pt")
    other["pixel_values"] = other_image["pixel_values"]
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, model(**other).logits)
