"""Grounding: <ref>/<box> as the data writes them, written in the target model's convention, found again in its
answers, and drawn on pictures.

Data uses Qwen-VL's form: <ref>a shirt</ref><box>(x1,y1),(x2,y2)</box>, coordinates normalised to [0,1000). A model
writes them in its GroundingStyle (tuning.families): its own tokens around the label and the box, these tags added
as new tokens, or a plain label before its box; the corners as two pairs or as a list ([[x1, y1, x2, y2]], the
boxes of one label in one list); coordinates in [0,1000), or in pixels of the picture as the model sees it (after
resizing). Answers are read in every style, whatever the model's.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from tuning.families import DATA_TAGS, GROUNDING_STYLES, GroundingStyle

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PAIR = rf"\({_NUM},{_NUM}\)"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
# what a box of any style holds between its tags: numbers in brackets, as pairs (x1,y1),(x2,y2) or as lists
# [x1, y1, x2, y2], [[x1, y1, x2, y2], [...]] (GLM-V says its brackets vary: (), [], [[]])
_BOX_BODY = r"[-\d.,;\s\[\]()]*"
_LIST_SEPARATORS = {"list": ", ", "compact-list": ","}


class GroundingError(ValueError):
    pass


def style_named(style: str | GroundingStyle) -> GroundingStyle:
    if isinstance(style, GroundingStyle):
        return style
    if style not in GROUNDING_STYLES:
        raise GroundingError(f"unknown grounding convention {style!r}; choose one of {', '.join(GROUNDING_STYLES)}")
    return GROUNDING_STYLES[style]


def _escaped(pair: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(map(re.escape, pair))


_DATA_REF, _DATA_BOX = _escaped(DATA_TAGS.ref), _escaped(DATA_TAGS.box)
BOX = re.compile(rf"{_DATA_BOX[0]}\s*{_PAIR}\s*,?\s*{_PAIR}\s*{_DATA_BOX[1]}")
BOXES = re.compile(rf"(?:{BOX.pattern})+")  # the boxes of one label: one after another, nothing between them
REF = re.compile(rf"{_DATA_REF[0]}(.*?){_DATA_REF[1]}", re.DOTALL)
ANY_BOX_TAG = re.compile("|".join(_escaped(DATA_TAGS.box)))


def has_grounding(text: str) -> bool:
    """Whether the text holds the data's tags."""
    return DATA_TAGS.ref[0] in text or any(tag in text for tag in DATA_TAGS.box)


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


def _written(boxes: list[list[int]], style: GroundingStyle) -> str:
    """The boxes of one label in the style: a tag each as pairs, or one tag around their list."""
    opening, closing = style.box
    if style.corners == "pairs":
        return "".join(f"{opening}({x1},{y1}),({x2},{y2}){closing}" for x1, y1, x2, y2 in boxes)
    if style.corners not in _LIST_SEPARATORS:
        raise GroundingError(f"grounding style {style.name} has unknown corners {style.corners!r}")
    sep = _LIST_SEPARATORS[style.corners]
    return f"{opening}[{sep.join('[' + sep.join(map(str, box)) + ']' for box in boxes)}]{closing}"


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

    def corners(match: re.Match) -> list[int]:
        coords = [float(c) for c in match.groups()]
        _check_box(coords, match.group(0))
        if style.pixels:
            width, height = image_size
            coords = [c * s / 1000 for c, s in zip(coords, (width, height, width, height), strict=True)]
        return [round(c) for c in coords]

    text = BOXES.sub(lambda run: _written([corners(m) for m in BOX.finditer(run.group(0))], style), text)
    if not style.ref:  # the label stays as plain text before its box
        text = REF.sub(lambda m: m.group(1), text)
    elif style.ref != DATA_TAGS.ref:
        text = REF.sub(lambda m: f"{style.ref[0]}{m.group(1)}{style.ref[1]}", text)
    return text


@dataclass
class Box:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class _AnswerPattern:
    """A box in any style with the ref before it: groups ref{i} per ref tag pair, body{j} per box tag pair."""

    pattern: re.Pattern
    refs: int
    boxes: tuple[tuple[str, str], ...]  # the box tag pairs, in group order
    plain: frozenset  # box tag pairs of the styles whose label is plain text before the box

    def parts(self, match: re.Match) -> tuple[str | None, tuple[str, str], list[list[float]]]:
        """(ref label or None, box tags, the corners of each box in it: none where it holds no fours of numbers)."""
        found = match.groupdict()
        ref = next((found[f"ref{i}"] for i in range(self.refs) if found[f"ref{i}"] is not None), None)
        j = next(j for j in range(len(self.boxes)) if found[f"body{j}"] is not None)
        numbers = [float(n) for n in _NUMBER.findall(found[f"body{j}"])]
        fours = [numbers[k : k + 4] for k in range(0, len(numbers), 4)] if len(numbers) % 4 == 0 else []
        return ref, self.boxes[j], fours


@functools.cache
def _answer_pattern() -> _AnswerPattern:
    refs = list(dict.fromkeys(s.ref for s in GROUNDING_STYLES.values() if s.ref))
    boxes = tuple(dict.fromkeys(s.box for s in GROUNDING_STYLES.values()))
    ref_alternatives = []
    for i, pair in enumerate(refs):
        opening, closing = _escaped(pair)
        ref_alternatives.append(rf"{opening}(?P<ref{i}>(?:(?!{opening}).)*?){closing}")  # no ref inside a label
    box_alternatives = []
    for j, pair in enumerate(boxes):
        opening, closing = _escaped(pair)
        box_alternatives.append(rf"{opening}(?P<body{j}>{_BOX_BODY}){closing}")
    pattern = re.compile(rf"(?:{'|'.join(ref_alternatives)})?\s*(?:{'|'.join(box_alternatives)})", re.DOTALL)
    plain = frozenset(s.box for s in GROUNDING_STYLES.values() if not s.ref)
    return _AnswerPattern(pattern, len(refs), boxes, plain)


def find_boxes(text: str, style: str | GroundingStyle, image_size: tuple[int, int] | None = None) -> list[Box]:
    """Boxes in a model's answer, in [0,1000) coordinates, each with the ref label that precedes it (or the last
    label before it; in a style without label tokens, the text before it on its line). Boxes of every style are
    found, several in one list too; those written in `style` are scaled back from pixels when the style is in
    pixels and `image_size` (the picture as the model saw it) is given."""
    style = style_named(style)
    answers = _answer_pattern()
    boxes: list[Box] = []
    label, end = "", 0
    for m in answers.pattern.finditer(text):
        ref, tags, fours = answers.parts(m)
        if ref:
            label = ref
        elif tags in answers.plain and fours:
            label = _leftover_tags().sub("", text[end : m.start()].rsplit("\n", 1)[-1]).strip() or label
        end = m.end()
        for coords in fours:
            if style.pixels and image_size and tags == style.box:
                width, height = image_size
                coords = [c * 1000 / s for c, s in zip(coords, (width, height, width, height), strict=True)]
            boxes.append(Box(label.strip(), *coords))
    return boxes


def has_boxes(text: str) -> bool:
    """Whether an answer holds a box in any style."""
    answers = _answer_pattern()
    return any(answers.parts(m)[2] for m in answers.pattern.finditer(text))


@functools.cache
def _leftover_tags() -> re.Pattern:
    tags = {tag for style in GROUNDING_STYLES.values() for tag in (*style.ref, *style.box)}
    return re.compile("|".join(re.escape(tag) for tag in sorted(tags, key=len, reverse=True)))


@functools.cache
def _refs() -> re.Pattern:
    pairs = dict.fromkeys(s.ref for s in GROUNDING_STYLES.values() if s.ref)
    return re.compile("|".join(rf"{o}(.*?){c}" for o, c in map(_escaped, pairs)), re.DOTALL)


def strip_tags(text: str) -> str:
    """Readable text of an answer: labels kept, boxes removed, and no tag left even from a malformed answer (what
    a box tag holds stays when it is no box: GLM-V marks plain final answers with its box tokens too)."""
    answers = _answer_pattern()

    def readable(m: re.Match) -> str:
        ref, _, fours = answers.parts(m)
        return (ref or "") if fours else m.group(0)

    text = answers.pattern.sub(readable, text)
    text = _refs().sub(lambda m: next(g for g in m.groups() if g is not None), text)
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
