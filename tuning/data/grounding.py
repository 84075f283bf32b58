"""Grounding tags: parse Qwen-VL's <ref>/<box> and write them in the target model's convention.

Data uses Qwen-VL's form: <ref>a shirt</ref><box>(x1,y1),(x2,y2)</box>, coordinates normalised to [0,1000).

| convention   | written as                                                             | coordinates               |
|--------------|------------------------------------------------------------------------|---------------------------|
| qwen-vl      | <ref>…</ref><box>(x1,y1),(x2,y2)</box>, the tags added as new tokens    | [0,1000)                  |
| qwen2-vl     | <|object_ref_start|>…<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|> | [0,1000)     |
| qwen2.5-vl   | the same tokens as qwen2-vl                                            | pixels of the resized image |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONVENTIONS = ("qwen-vl", "qwen2-vl", "qwen2.5-vl")
QWEN_VL_TAGS = ("<ref>", "</ref>", "<box>", "</box>")
NATIVE_TAGS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>")

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PAIR = rf"\({_NUM},{_NUM}\)"
BOX = re.compile(rf"<box>\s*{_PAIR}\s*,?\s*{_PAIR}\s*</box>")
NATIVE_BOX = re.compile(rf"<\|box_start\|>\s*{_PAIR}\s*,?\s*{_PAIR}\s*<\|box_end\|>")
REF = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)
NATIVE_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", re.DOTALL)
ANY_BOX_TAG = re.compile(r"</?box>")


class GroundingError(ValueError):
    pass


def convention_for(model_type: str, vocab: set[str] | dict) -> str:
    """The model's own grounding convention, chosen from its config and vocabulary, not its name."""
    if model_type == "qwen2_5_vl":
        return "qwen2.5-vl"
    if all(tag in vocab for tag in NATIVE_TAGS):
        return "qwen2-vl"
    return "qwen-vl"


def has_grounding(text: str) -> bool:
    return "<ref>" in text or "<box>" in text or "</box>" in text


def _check_box(coords: list[float], source: str) -> None:
    x1, y1, x2, y2 = coords
    if not all(0 <= c < 1000 for c in coords):
        raise GroundingError(f"box {source} has a coordinate outside [0,1000); boxes are normalised to [0,1000)")
    if x1 > x2 or y1 > y2:
        raise GroundingError(f"box {source} has its corners swapped; write (left,top),(right,bottom)")


def box_tag(coords) -> str:
    """Qwen-VL's <box> for [0,1000) coordinates, rounded to whole numbers as Qwen-VL writes them."""
    x1, y1, x2, y2 = (round(c) for c in coords)
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def convert(text: str, convention: str, image_size: tuple[int, int] | None = None) -> str:
    """Rewrite Qwen-VL grounding tags in `text` for `convention`.

    `image_size` is (width, height) of the image the model sees after resizing; qwen2.5-vl needs it.
    """
    if not has_grounding(text):
        return text
    if convention not in CONVENTIONS:
        raise GroundingError(f"unknown grounding convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    leftover = BOX.sub("", text)
    if ANY_BOX_TAG.search(leftover):
        raise GroundingError("a <box> tag is not of the form <box>(x1,y1),(x2,y2)</box>")
    if convention == "qwen2.5-vl" and image_size is None:
        raise GroundingError("a box with no image before it; qwen2.5-vl boxes are pixels of an image")

    def box(match: re.Match) -> str:
        coords = [float(c) for c in match.groups()]
        _check_box(coords, match.group(0))
        if convention == "qwen-vl":
            return box_tag(coords)
        if convention == "qwen2.5-vl":
            width, height = image_size
            scale = (width, height, width, height)
            coords = [c * s / 1000 for c, s in zip(coords, scale, strict=True)]
        x1, y1, x2, y2 = (round(c) for c in coords)
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"

    text = BOX.sub(box, text)
    if convention != "qwen-vl":
        text = REF.sub(lambda m: f"<|object_ref_start|>{m.group(1)}<|object_ref_end|>", text)
    return text


@dataclass
class Box:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float


def find_boxes(text: str, convention: str, image_size: tuple[int, int] | None = None) -> list[Box]:
    """Boxes in a model's answer, in [0,1000) coordinates, each with the ref label that precedes it."""
    boxes: list[Box] = []
    pattern = re.compile(
        r"(?:<ref>(?P<ref>.*?)</ref>|<\|object_ref_start\|>(?P<nref>.*?)<\|object_ref_end\|>)?\s*"
        rf"(?:<box>\s*{_PAIR}\s*,?\s*{_PAIR}\s*</box>|<\|box_start\|>\s*{_PAIR}\s*,?\s*{_PAIR}\s*<\|box_end\|>)",
        re.DOTALL,
    )
    label = ""
    for m in pattern.finditer(text):
        label = m.group("ref") or m.group("nref") or label
        numbers = [g for g in m.groups()[2:] if g is not None]
        coords = [float(n) for n in numbers]
        if convention == "qwen2.5-vl" and m.group(0).find("<|box_start|>") >= 0 and image_size:
            width, height = image_size
            coords = [c * 1000 / s for c, s in zip(coords, (width, height, width, height), strict=True)]
        boxes.append(Box(label.strip(), *coords))
    return boxes


LEFTOVER_TAGS = re.compile(r"</?(?:ref|box)>|<\|(?:object_ref_start|object_ref_end|box_start|box_end)\|>")


def strip_tags(text: str) -> str:
    """Readable text of an answer: labels kept, boxes removed, and no tag left even from a malformed answer."""
    text = BOX.sub("", NATIVE_BOX.sub("", text))
    text = REF.sub(lambda m: m.group(1), text)
    text = NATIVE_REF.sub(lambda m: m.group(1), text)
    return LEFTOVER_TAGS.sub("", text)
