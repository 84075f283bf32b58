"""Did the model learn? Exact-match accuracy of greedy answers on held-out samples, with picture controls.

    python -m tuning.evaluate MODEL --data data/generated/shapes/test.json [--adapter DIR] [--picture blank]

`--picture blank` replaces every picture by an empty one and `--picture shuffled` gives each question
another sample's picture: if the answers come from the pixels, accuracy falls to chance.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tuning.chat import Chat, GenerationSettings, load_for_chat, split_thinking
from tuning.data import grounding
from tuning.data.conversation import ImageRef, VideoRef
from tuning.data.errors import DataError
from tuning.data.formats import iter_conversations
from tuning.data.media.images import load_image
from tuning.families import DATA_TAGS, UnsupportedFamily

PICTURE_MODES = ("real", "blank", "shuffled")


@dataclass
class Score:
    correct: int
    total: int
    examples: list[tuple[str, str, str]]  # (question, expected, answer) of the first few
    bad: list[str] = field(default_factory=list)  # records that could not be read, each with where and why
    skipped: list[str] = field(default_factory=list)  # ids of samples that are not one question and one answer

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.correct}/{self.total} ({self.accuracy:.0%})"


@dataclass
class HeldOut:
    question: str
    images: list[ImageRef]
    expected: str
    labelled: bool  # the data labels its pictures "Picture N:" (Qwen-VL), so the question is asked that way
    videos: list[VideoRef] = field(default_factory=list)
    # The user turn as the data writes it: text, pictures and videos in their order, the text unstripped. A model
    # trained on "<picture>\nWhere is the shape?" answers that prompt without its newline differently (measured on
    # the tiny Qwen2.5-VL's grounding exercise: 10/30 asked without it, 30/30 asked as trained).
    parts: list = field(default_factory=list)

    def message(self, pictures: list) -> dict:
        """The user turn for the chat, with `pictures` in the places of the data's own."""
        parts = self.parts or [*self.images, *self.videos, self.question]
        if len(pictures) == len(self.images):
            substitutes = iter(pictures)
            parts = [next(substitutes) if isinstance(part, ImageRef) else part for part in parts]
        else:  # another sample's pictures, not as many: they go first, as the chat places pictures
            parts = [*pictures, *(part for part in parts if not isinstance(part, ImageRef))]
        return {"role": "user", "content": [content_part(part) for part in parts]}


def content_part(part) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if isinstance(part, VideoRef):
        return {"type": "video", "video": part}
    return {"type": "image", "image": part}  # an ImageRef or a picture in memory (a blank one)


@dataclass
class HeldOutSet:
    samples: list[HeldOut] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def single_turn_samples(path: str | Path, id_suffix: str | None = None) -> HeldOutSet:
    """Every single-exchange sample (question, pictures, expected answer), optionally filtered by id suffix; a
    record that cannot be read, or is not one question and one answer, is listed, not dropped silently."""
    found = HeldOutSet()
    for conv in iter_conversations([path]):
        if isinstance(conv, DataError):
            found.bad.append(str(conv))
            continue
        if id_suffix and not conv.id.endswith(id_suffix):
            continue
        if conv.pretrain_text is not None or [m.role for m in conv.messages] != ["user", "assistant"]:
            found.skipped.append(conv.id)
            continue
        user, assistant = conv.messages
        found.samples.append(
            HeldOut(user.text.strip(), user.images, assistant.text.strip(), conv.add_vision_id, user.videos, user.parts)
        )
    return found


def pictures_for(mode: str, images: list[list[ImageRef]], seed: int = 0) -> list[list]:
    """The pictures each question is asked with: its own, blank ones of the same sizes, or another sample's."""
    if mode == "blank":
        return [[Image.new("RGB", load_image(ref).size, (240, 240, 240)) for ref in refs] for refs in images]
    if mode == "shuffled":
        order = list(range(len(images)))
        random.Random(seed).shuffle(order)
        return [images[i] for i in order]
    return images


def iou(a: grounding.Box, b: grounding.Box) -> float:
    width = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    height = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = width * height
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


def is_correct(chat: Chat, answer: str, expected: str, picture) -> bool:
    """Exact text, or for grounding answers the same labels and every box overlapping its own by IoU >= 0.5."""
    if not grounding.has_grounding(expected):
        return answer == expected
    want = grounding.find_boxes(expected, DATA_TAGS)
    got = chat.answer_boxes(answer, picture)
    return len(got) == len(want) and all(
        g.label == w.label and iou(g, w) >= 0.5 for g, w in zip(got, want, strict=True)
    )


def ask(chat: Chat, sample: HeldOut, pictures: list) -> str:
    """The greedy answer to one held-out question, asked as the data writes it, with `pictures` as its pictures."""
    chat.reset()
    chat.add_vision_id = sample.labelled
    answer = ""
    for partial in chat.stream_reply([sample.message(pictures)]):
        answer = partial
    # the answer after the reasoning: Qwen3.5's template writes an empty think block before every trained answer
    return split_thinking(answer)[1].strip()


def exact_match(chat: Chat, path: str | Path, id_suffix: str | None = None, picture: str = "real") -> Score:
    """Each question asked as the data writes it: its text, pictures and videos in their order, with "Picture N:"
    labels only where the data has them."""
    held_out = single_turn_samples(path, id_suffix)
    samples = held_out.samples
    images = pictures_for(picture, [s.images for s in samples])
    correct, examples = 0, []
    for sample, pictures in zip(samples, images, strict=True):
        answer = ask(chat, sample, pictures)
        correct += is_correct(chat, answer, sample.expected, pictures[-1] if pictures else None)
        if len(examples) < 3:
            examples.append((sample.question, sample.expected, answer))
    return Score(correct, len(samples), examples, held_out.bad, held_out.skipped)


def draw_first_grounded(chat: Chat, path: str | Path, out: Path) -> str | None:
    """Ask the first grounding question of the data and draw the boxes of the answer on its picture."""
    for sample in single_turn_samples(path).samples:
        if grounding.has_grounding(sample.expected) and sample.images:
            answer = ask(chat, sample, sample.images)
            boxes = chat.answer_boxes(answer, sample.images[-1])
            image = load_image(sample.images[-1])
            big = image.resize((image.width * 4, image.height * 4), Image.NEAREST)
            grounding.draw_boxes(big, boxes).save(out)
            print(f"grounded answer {answer!r} drawn on its picture: {out}")
            return answer
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="held-out samples (single question and answer each)")
    parser.add_argument("--adapter")
    parser.add_argument("--id_suffix", help="only samples whose id ends with this (e.g. _colour)")
    parser.add_argument("--picture", choices=PICTURE_MODES, default="real")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the score as JSON")
    parser.add_argument("--draw", type=Path, help="draw the boxes of the first grounded answer on its picture here")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, processor = load_for_chat(args.model, args.adapter)
    except UnsupportedFamily as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chat = Chat(model, tokenizer, processor, settings=GenerationSettings(args.max_new_tokens))
    score = exact_match(chat, args.data, args.id_suffix, args.picture)
    if args.draw:
        draw_first_grounded(chat, args.data, args.draw)
    if args.json:
        numbers = {"correct": score.correct, "total": score.total, "accuracy": score.accuracy}
        print(json.dumps({**numbers, "bad": score.bad, "skipped": score.skipped}))
    else:
        print(f"{args.picture} pictures: {score}")
        for question, want, answer in score.examples:
            print(f"  {question!r}: expected {want!r}, answered {answer!r}")
    for problem in score.bad:
        print(f"not evaluated, the record cannot be read: {problem}", file=sys.stderr)
    if score.skipped:
        print(
            f"not evaluated, not one question and one answer: {len(score.skipped)} samples "
            f"({', '.join(score.skipped[:5])}{', ...' if len(score.skipped) > 5 else ''})",
            file=sys.stderr,
        )
    return 1 if score.bad else 0


if __name__ == "__main__":
    sys.exit(main())
