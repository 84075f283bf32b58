"""The tiny vision-language builds of tuning/tiny/vision.py: each loads with the Auto classes like a hub checkpoint,
trains on a picture (finite loss), reads the picture (another picture changes the logits) and generates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tuning.tiny import KINDS, TinySpec, build

VISION_KINDS = ["llava", "gemma3", "llava-onevision", "internvl", "smolvlm", "mistral3", "mllama", "glm4v"]
# GLM-4.1V's template writes an assistant turn's content raw ({{ msg.content }}): it must be a string there,
# while LLaVA's and SmolVLM's templates only read content given as a list of parts.
STRING_ANSWER = {"glm4v"}


def picture(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def chat(kind: str, image: Image.Image, answer: str | None = "It is red.") -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    if answer is not None:
        content = answer if kind in STRING_ANSWER else [{"type": "text", "text": answer}]
        messages.append({"role": "assistant", "content": content})
    return messages


def encode(processor, messages, **kwargs):
    return processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt", **kwargs)


@pytest.fixture(scope="module", params=VISION_KINDS)
def tiny(request, tmp_path_factory):
    folder = build(TinySpec(kind=request.param), tmp_path_factory.mktemp(request.param) / "model")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return request.param, model, AutoProcessor.from_pretrained(folder)


def test_loads_as_its_family_with_the_auto_classes(tiny):
    kind, model, processor = tiny
    assert type(model).__name__ == KINDS[kind].model_class
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert processor.chat_template == KINDS[kind].template
    stops = model.generation_config.eos_token_id
    assert stops and all(processor.tokenizer.convert_ids_to_tokens(i) for i in stops)


def test_a_picture_with_labels_gives_a_finite_loss_and_reaches_the_text(tiny):
    kind, model, processor = tiny
    first = encode(processor, chat(kind, picture(1)))
    second = encode(processor, chat(kind, picture(2)))
    assert torch.equal(first["input_ids"], second["input_ids"])  # same size: same tokens, only the pixels differ
    with torch.no_grad():
        out = model(**first, labels=first["input_ids"].clone())
        other = model(**second)
    assert torch.isfinite(out.loss)
    # a projector or gate left at zero would make the text blind: the logits would not move
    assert (out.logits - other.logits).abs().max() > 1e-3


def test_generate_runs_with_a_picture(tiny):
    kind, model, processor = tiny
    inputs = encode(processor, chat(kind, picture(3), answer=None), add_generation_prompt=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 4


def test_build_is_byte_identical(tmp_path):
    first, second = build(TinySpec(kind="llava"), tmp_path / "a"), build(TinySpec(kind="llava"), tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json", "chat_template.jinja"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
