"""Draw the pictures of the seed examples, so the demo data needs nothing from the network.

    python data/draw_images.py            # writes data/images/*.png

The dog picture carries a plaid shirt exactly inside the box that data/example.json's grounding
answer names, (588,499),(725,789) in Qwen-VL's [0,1000) coordinates.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = (320, 240)
SHIRT_BOX = (588, 499, 725, 789)  # the <box> of data/example.json, normalised to [0,1000)


def to_pixels(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    w, h = size
    x1, y1, x2, y2 = box
    return round(x1 * w / 1000), round(y1 * h / 1000), round(x2 * w / 1000), round(y2 * h / 1000)


def draw_dog() -> Image.Image:
    img = Image.new("RGB", SIZE, (134, 190, 96))  # a lawn
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, SIZE[0], 70), fill=(170, 210, 240))  # sky
    d.ellipse((60, 100, 200, 190), fill=(205, 160, 90))  # body
    d.ellipse((30, 70, 100, 130), fill=(215, 170, 100))  # head
    d.ellipse((28, 78, 48, 115), fill=(170, 120, 60))  # ear
    d.ellipse((55, 90, 63, 98), fill=(20, 20, 20))  # eye
    for x in (80, 110, 150, 175):
        d.rectangle((x, 180, x + 12, 215), fill=(195, 150, 85))  # legs
    x1, y1, x2, y2 = to_pixels(SHIRT_BOX, SIZE)
    d.rectangle((x1, y1, x2, y2), fill=(200, 30, 40))  # a plaid shirt hanging on the right
    for x in range(x1, x2, 8):
        d.line((x, y1, x, y2), fill=(30, 30, 120), width=2)
    for y in range(y1, y2, 8):
        d.line((x1, y, x2, y), fill=(30, 30, 120), width=2)
    return img


def draw_skyline(seed: int, sky: tuple[int, int, int], ground: tuple[int, int, int], tall: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", SIZE, sky)
    d = ImageDraw.Draw(img)
    x = 0
    while x < SIZE[0]:
        width = rng.randint(18, 40)
        top = rng.randint(SIZE[1] - tall, SIZE[1] - 60)
        shade = rng.randint(60, 140)
        d.rectangle((x, top, x + width, SIZE[1]), fill=(shade, shade, shade + 20))
        for wy in range(top + 6, SIZE[1] - 40, 10):  # lit windows
            d.rectangle((x + 4, wy, x + 8, wy + 4), fill=(250, 230, 150))
        x += width + rng.randint(0, 6)
    d.rectangle((0, SIZE[1] - 40, SIZE[0], SIZE[1]), fill=ground)
    return img


def draw_all(folder: Path = HERE / "images") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {
        "dog.png": draw_dog(),
        # Chongqing: tall towers over a river at dusk; Beijing: low wide buildings on a plain by day.
        "chongqing.png": draw_skyline(1, (250, 160, 110), (40, 90, 140), tall=220),
        "beijing.png": draw_skyline(2, (180, 200, 230), (150, 140, 120), tall=130),
    }
    paths = []
    for name, img in pictures.items():
        path = folder / name
        img.save(path, optimize=False)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in draw_all():
        print(p.relative_to(HERE.parent))
