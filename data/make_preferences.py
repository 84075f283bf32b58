"""Generate the preference exercises: pairs whose chosen answer follows a rule the rejected one breaks.

    python data/make_preferences.py --task words [--out data/generated/preferences] [--train 240] [--test 40]
    python data/make_preferences.py --task colours [--out data/generated/colour-pairs] [--train 240] [--test 30]

words (TRL's conversational shape): a question asks for a word of one kind (an animal, a fruit, a colour, a
number); the chosen answer is a word of that kind, the rejected one a word of another kind. The held-out questions
are phrased in ways training never shows (test.jsonl), or as training phrases them, about pairs of words it never
saw together (test_trained_phrasings.jsonl). Also written unpaired (train_unpaired.jsonl: each pair's two answers with
their label, TRL's KTO shape).

colours (TRL's vision shape: `images` and an image part): "What colour is the shape?" about a coloured shape; the
chosen answer names its colour, the rejected one another colour, so only the pixels say which is right.
test_blank.jsonl asks the same about a blank picture: there the preference is at chance.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

KINDS = {
    "animal": ["cat", "dog", "horse", "cow", "sheep"],
    "fruit": ["apple", "pear", "plum", "grape", "mango"],
    "colour": ["red", "blue", "green", "pink", "brown"],
    "number": ["seven", "three", "nine", "four", "six"],
}
TRAIN_PHRASINGS = [
    "Name a {kind}.",
    "Say one {kind}.",
    "Give me a {kind}.",
    "Tell me a {kind}, please.",
    "Which {kind} comes to mind?",
    "One {kind}, please.",
]
HELD_OUT_PHRASINGS = ["Can you name a {kind}?", "Pick any {kind}."]


def word_pairs(count: int, phrasings: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        kind, other = rng.sample(list(KINDS), 2)
        question = rng.choice(phrasings).format(kind=kind)
        chosen, rejected = rng.choice(KINDS[kind]), rng.choice(KINDS[other])
        pairs.append(
            {
                "id": f"words-{seed}-{i}",
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": f"{chosen.capitalize()}."}],
                "rejected": [{"role": "assistant", "content": f"{rejected.capitalize()}."}],
            }
        )
    return pairs


def unpaired(pairs: list[dict]) -> list[dict]:
    """Each pair as two KTO records: its prompt with the chosen answer (desirable), with the rejected (not)."""
    out = []
    for pair in pairs:
        for key, label in (("chosen", True), ("rejected", False)):
            out.append({"id": f"{pair['id']}-{key}", "prompt": pair["prompt"], "completion": pair[key], "label": label})
    return out


def colour_pairs(folder: Path, name: str, count: int, seed: int, blank: bool = False) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).parent))
    from make_shapes import COLOUR_QUESTION, COLOURS, SHAPES, SIZE, draw
    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image, _ = draw(rng, colour, shape)
        path = f"images/{name}_{i}.png"
        (Image.new("RGB", (SIZE, SIZE), (240, 240, 240)) if blank else image).save(folder / path)
        rejected = rng.choice([c for c in COLOURS if c != colour])
        pairs.append(
            {
                "id": f"{name}-{i}",
                "images": [path],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": COLOUR_QUESTION}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": colour}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            }
        )
    return pairs


def write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["words", "colours"], default="words")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--test", type=int, default=None)
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "generated" / ("preferences" if args.task == "words" else "colour-pairs")
    if args.task == "words":
        train = word_pairs(args.train, TRAIN_PHRASINGS, seed=1)
        print(write(out / "train.jsonl", train))
        print(write(out / "train_unpaired.jsonl", unpaired(train)))
        print(write(out / "test.jsonl", word_pairs(args.test or 40, HELD_OUT_PHRASINGS, seed=2)))
        print(write(out / "test_trained_phrasings.jsonl", word_pairs(args.test or 40, TRAIN_PHRASINGS, seed=3)))
        return
    print(write(out / "train.jsonl", colour_pairs(out, "train", args.train, seed=1)))
    print(write(out / "test.jsonl", colour_pairs(out, "test", args.test or 30, seed=2)))
    print(write(out / "test_blank.jsonl", colour_pairs(out, "blank", args.test or 30, seed=2, blank=True)))


if __name__ == "__main__":
    main()
