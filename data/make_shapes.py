"""Generate the vision exercise: coloured shapes whose colour and place only the picture tells.

    python data/make_shapes.py [--out data/generated/shapes] [--train 300] [--test 30]

Writes train.json and test.json in Qwen-VL format with `Picture 1: <img>...</img>` (or with --format llava,
LLaVA's `image` field and `<image>` placeholder: the same pictures and answers). Each picture gets
two questions: the shape's colour (one word, chance 1/3) and where it is (a <ref>/<box> answer in
[0,1000), which training writes in the model's convention). The shape fills most of one of four corners:
tuning.evaluate counts a box right when its label is the shape's and it overlaps the true box by IoU >= 0.5,
which only a box in the right corner does (chance 1/4).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square", "triangle")
SIZE = 56
COLOUR_QUESTION = "What colour is the shape?"
WHERE_QUESTION = "Where is the shape?"


SIDE = 22
CORNERS = ((3, 3), (31, 3), (3, 31), (31, 31))  # top-left, top-right, bottom-left, bottom-right


def draw(rng: random.Random, colour: str, shape: str) -> tuple[Image.Image, tuple[int, int, int, int]]:
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (SIZE, SIZE), (shade, shade, shade))
    side = SIDE
    x, y = rng.choice(CORNERS)
    box = (x, y, x + side, y + side)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=COLOURS[colour])
    return image, box


def normalised(box: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = (min(999, round(v * 1000 / SIZE)) for v in box)
    return f"({x1},{y1}),({x2},{y2})"


def sample(sample_id: str, path: str, question: str, answer: str, style: str) -> dict:
    """One question about one picture, in Qwen-VL's format or in LLaVA's."""
    if style == "llava":
        turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        return {"id": sample_id, "image": path, "conversations": turns}
    turns = [
        {"from": "user", "value": f"Picture 1: <img>{path}</img>\n{question}"},
        {"from": "assistant", "value": answer},
    ]
    return {"id": sample_id, "conversations": turns}


def make_split(folder: Path, name: str, count: int, seed: int, style: str = "qwen-vl") -> Path:
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        image, box = draw(rng, colour, shape)
        path = f"images/{name}_{i}.png"
        image.save(folder / path)
        where = f"<ref>the {shape}</ref><box>{normalised(box)}</box>"
        samples.append(sample(f"{name}_{i}_colour", path, COLOUR_QUESTION, colour, style))
        samples.append(sample(f"{name}_{i}_where", path, WHERE_QUESTION, where, style))
    out = folder / f"{name}.json"
    out.write_text(json.dumps(samples, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "generated" / "shapes")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=30)
    parser.add_argument("--format", choices=["qwen-vl", "llava"], default="qwen-vl", help="how the samples are written")
    args = parser.parse_args()
    print(make_split(args.out, "train", args.train, seed=1, style=args.format))
    print(make_split(args.out, "test", args.test, seed=2, style=args.format))


if __name__ == "__main__":
    main()
