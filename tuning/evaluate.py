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

from tuning.chat import Chat, GenerationSettings, answer_boxes, load_for_chat
from tuning.data import grounding
from tuning.data.conversation import ImageRef
from tuning.data.formats import iter_conversations
from tuning.data.media.images import load_image, resolve_local

PICTURE_MODES = ("real", "blank", "shuffled")


@dataclass
class Score:
    correct: int
    total: int
    examples: list[tuple[str, str, str]]  # (question, expected, answer) of the first few

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.correct}/{self.total} ({self.accuracy:.0%})"


@dataclass
class HeldOut:
    question: str
    images: list[Image.Image]
    expected: str
    labelled: bool  # the data labels its pictures "Picture N:" (Qwen-VL), so the question is asked that way
    videos: list[str] = field(default_factory=list)  # video files


def single_turn_samples(path: str | Path, id_suffix: str | None = None):
    """Every single-exchange sample (question, pictures, expected answer), optionally filtered by id suffix."""
    for conv in iter_conversations([path]):
        if not hasattr(conv, "messages") or len(conv.messages) != 2:
            continue
        if id_suffix and not conv.id.endswith(id_suffix):
            continue
        user, assistant = conv.messages
        images = [load_image(ref) for ref in user.images]
        videos = [str(resolve_local(ImageRef(v.source, v.base_dir), None)) for v in user.videos]
        yield HeldOut(user.text.strip(), images, assistant.text.strip(), conv.add_vision_id, videos)


def pictures_for(mode: str, images: list[list[Image.Image]], seed: int = 0) -> list[list[Image.Image]]:
    if mode == "blank":
        return [[Image.new("RGB", img.size, (240, 240, 240)) for img in imgs] for imgs in images]
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


def is_correct(chat: Chat, answer: str, expected: str, image: Image.Image | None) -> bool:
    """Exact text, or for grounding answers the same labels and every box overlapping its own by IoU >= 0.5."""
    if not grounding.has_grounding(expected):
        return answer == expected
    want = grounding.find_boxes(expected, "qwen-vl")
    got = answer_boxes(answer, chat.model.config.model_type, chat.processor, image)
    return len(got) == len(want) and all(
        g.label == w.label and iou(g, w) >= 0.5 for g, w in zip(got, want, strict=True)
    )


def exact_match(chat: Chat, path: str | Path, id_suffix: str | None = None, picture: str = "real") -> Score:
    """Each question asked as the data writes it: with "Picture N:" labels only where the data has them."""
    samples = list(single_turn_samples(path, id_suffix))
    images = pictures_for(picture, [s.images for s in samples])
    correct, examples = 0, []
    for sample, imgs in zip(samples, images, strict=True):
        chat.reset()
        chat.add_vision_id = sample.labelled
        answer = chat.ask(sample.question, imgs or None, sample.videos or None).strip()
        correct += is_correct(chat, answer, sample.expected, imgs[-1] if imgs else None)
        if len(examples) < 3:
            examples.append((sample.question, sample.expected, answer))
    return Score(correct, len(samples), examples)


def draw_first_grounded(chat: Chat, path: str | Path, out: Path) -> str | None:
    """Ask the first grounding question of the data and draw the boxes of the answer on its picture."""
    from tuning.demo import draw_boxes

    for sample in single_turn_samples(path):
        images = sample.images
        if grounding.has_grounding(sample.expected) and images:
            chat.reset()
            chat.add_vision_id = sample.labelled
            answer = chat.ask(sample.question, images)
            boxes = answer_boxes(answer, chat.model.config.model_type, chat.processor, images[-1])
            big = images[-1].resize((images[-1].width * 4, images[-1].height * 4), Image.NEAREST)
            draw_boxes(big, boxes).save(out)
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
    model, tokenizer, processor = load_for_chat(args.model, args.adapter)
    chat = Chat(model, tokenizer, processor, settings=GenerationSettings(args.max_new_tokens))
    score = exact_match(chat, args.data, args.id_suffix, args.picture)
    if args.draw:
        draw_first_grounded(chat, args.data, args.draw)
    if args.json:
        print(json.dumps({"correct": score.correct, "total": score.total, "accuracy": score.accuracy}))
    else:
        print(f"{args.picture} pictures: {score}")
        for question, want, answer in score.examples:
            print(f"  {question!r}: expected {want!r}, answered {answer!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
