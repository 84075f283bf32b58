"""Grounding: <ref>/<box> as the data writes them, written in the target model's convention, found again in its
answers, and drawn on pictures.

Data uses Qwen-VL's form: <ref>a shirt</ref><box>(x1,y1),(x2,y2)</box>, coordinates normalised to [0,1000). A model
writes them in its GroundingStyle (tuning.families): its own tokens around the label and the box, or these tags
added as new tokens; coordinates in [0,1000), or in pixels of the picture as the model sees it (after resizing).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from tuning.families import DATA_TAGS, GROUNDING_STYLES, GroundingStyle

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PAIR = rf"\({_NUM},{_NUM}\)"


class GroundingError(ValueError):
    pass


def style_named(style: str | GroundingStyle) -> GroundingStyle:
    if isinstance(style, GroundingStyle):
        return style
    if style not in GROUNDING_STYLES:
        raise GroundingError(f"unknown grounding convention {style!r}; choose one of {', '.join(GROUNDING_STYLES)}")
    return GROUNDING_STYLES[style]


@functools.cache
def _patterns(style: GroundingStyle) -> tuple[re.Pattern, re.Pattern]:
    """(box, ref) of a style: the box's two corners as groups, the ref's label as a group."""
    (ref_open, ref_close), (box_open, box_close) = (tuple(map(re.escape, pair)) for pair in (style.ref, style.box))
    box = re.compile(rf"{box_open}\s*{_PAIR}\s*,?\s*{_PAIR}\s*{box_close}")
    return box, re.compile(rf"{ref_open}(.*?){ref_close}", re.DOTALL)


BOX, REF = _patterns(DATA_TAGS)
ANY_BOX_TAG = re.compile("|".join(re.escape(tag) for tag in DATA_TAGS.box))


def has_grounding(text: str) -> bool:
    """Whether the text holds the data's tags."""
    return DATA_TAGS.ref[0] in text or any(tag in text for tag in DATA_TAGS.box)


def has_boxes(text: str) -> bool:
    """Whether an answer holds a box in any style."""
    return any(style.box[0] in text for style in GROUNDING_STYLES.values())


def uses_grounding(conversations) -> bool:
    """Whether any conversation has <ref>/<box> text or a box to place (ms-swift's objects)."""
    from tuning.data.conversation import BoxRef

    parts = (part for c in conversations for m in c.messages for part in m.parts)
    return any(isinstance(p, BoxRef) or (isinstance(p, str) and has_grounding(p)) for p in parts)


def _check_box(coords: list[float], source: str) -> None:
    x1, y1, x2, y2 = coords
    if not all(0 <= c < 1000 for c in coords):
        raise GroundingError(f"box {source} has a coordinate outside [0,1000); boxes are normalised to [0,1000)")
    if x1 > x2 or y1 > y2:
        raise GroundingError(f"box {source} has its corners swapped; write (left,top),(right,bottom)")


def box_tag(coords) -> str:
    """The data's <box> for [0,1000) coordinates, rounded to whole numbers as Qwen-VL writes them."""
    x1, y1, x2, y2 = (round(c) for c in coords)
    return f"{DATA_TAGS.box[0]}({x1},{y1}),({x2},{y2}){DATA_TAGS.box[1]}"


def convert(text: str, style: str | GroundingStyle, image_size: tuple[int, int] | None = None) -> str:
    """Rewrite the data's grounding tags in `text` in `style`.

    `image_size` is (width, height) of the picture the model sees after resizing; a style in pixels needs it.
    """
    if not has_grounding(text):
        return text
    style = style_named(style)
    leftover = BOX.sub("", text)
    if ANY_BOX_TAG.search(leftover):
        raise GroundingError("a <box> tag is not of the form <box>(x1,y1),(x2,y2)</box>")
    if style.pixels and image_size is None:
        raise GroundingError(f"a box with no image before it; {style.name} boxes are pixels of an image")

    def box(match: re.Match) -> str:
        coords = [float(c) for c in match.groups()]
        _check_box(coords, match.group(0))
        if style.pixels:
            width, height = image_size
            coords = [c * s / 1000 for c, s in zip(coords, (width, height, width, height), strict=True)]
        x1, y1, x2, y2 = (round(c) for c in coords)
        return f"{style.box[0]}({x1},{y1}),({x2},{y2}){style.box[1]}"

    text = BOX.sub(box, text)
    if style.ref != DATA_TAGS.ref:
        text = REF.sub(lambda m: f"{style.ref[0]}{m.group(1)}{style.ref[1]}", text)
    return text


@dataclass
class Box:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float


@functools.cache
def _answer_pattern() -> tuple[re.Pattern, tuple[GroundingStyle, ...]]:
    """One pattern for a box in any style, with the ref before it: groups ref{i}, then box{i}_1..4 per style."""
    styles = tuple({(s.ref, s.box): s for s in GROUNDING_STYLES.values()}.values())  # one per tag pair
    refs, boxes = [], []
    for i, style in enumerate(styles):
        (ref_open, ref_close), (box_open, box_close) = (tuple(map(re.escape, pair)) for pair in (style.ref, style.box))
        refs.append(rf"{ref_open}(?P<ref{i}>.*?){ref_close}")
        corners = [rf"\s*(?P<box{i}_{k}>-?\d+(?:\.\d+)?)\s*" for k in range(4)]
        boxes.append(rf"{box_open}\s*\({corners[0]},{corners[1]}\)\s*,?\s*\({corners[2]},{corners[3]}\)\s*{box_close}")
    pattern = re.compile(rf"(?:{'|'.join(refs)})?\s*(?:{'|'.join(boxes)})", re.DOTALL)
    return pattern, styles


def find_boxes(text: str, style: str | GroundingStyle, image_size: tuple[int, int] | None = None) -> list[Box]:
    """Boxes in a model's answer, in [0,1000) coordinates, each with the ref label that precedes it (or the last
    label before it). Boxes of every style are found; those written in `style` are scaled back from pixels when the
    style is in pixels and `image_size` (the picture as the model saw it) is given."""
    style = style_named(style)
    pattern, styles = _answer_pattern()
    boxes: list[Box] = []
    label = ""
    for m in pattern.finditer(text):
        found = m.groupdict()
        label = next((found[f"ref{i}"] for i in range(len(styles)) if found[f"ref{i}"]), None) or label
        which = next(i for i in range(len(styles)) if found[f"box{i}_0"] is not None)
        coords = [float(found[f"box{which}_{k}"]) for k in range(4)]
        if style.pixels and image_size and styles[which].box == style.box:
            width, height = image_size
            coords = [c * 1000 / s for c, s in zip(coords, (width, height, width, height), strict=True)]
        boxes.append(Box(label.strip(), *coords))
    return boxes


@functools.cache
def _leftover_tags() -> re.Pattern:
    tags = {tag for style in GROUNDING_STYLES.values() for tag in (*style.ref, *style.box)}
    return re.compile("|".join(re.escape(tag) for tag in sorted(tags, key=len, reverse=True)))


def strip_tags(text: str) -> str:
    """Readable text of an answer: labels kept, boxes removed, and no tag left even from a malformed answer."""
    for style in GROUNDING_STYLES.values():
        box, ref = _patterns(style)
        text = ref.sub(lambda m: m.group(1), box.sub("", text))
    return _leftover_tags().sub("", text)


BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4")


def draw_boxes(image, boxes: list[Box]):
    """The boxes ([0,1000) coordinates) and their labels drawn on a copy of the picture."""
    from PIL import ImageDraw

    drawn = image.convert("RGB").copy()
    draw = ImageDraw.Draw(drawn)
    width, height = drawn.size
    line = max(2, round(min(width, height) / 150))
    for i, box in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        corners = (box.x1 * width / 1000, box.y1 * height / 1000, box.x2 * width / 1000, box.y2 * height / 1000)
        draw.rectangle(corners, outline=colour, width=line)
        if box.label:
            draw.text((corners[0] + line + 1, corners[1] + line), box.label, fill=colour)
    return drawn
