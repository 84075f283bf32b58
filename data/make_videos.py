"""Generate the video exercise: a coloured square moves across a few frames; only the video tells its colour.

    python data/make_videos.py [--out data/generated/videos] [--train 120] [--test 30] [--blank]

Writes train.json and test.json in the LLaVA-style video format of Qwen2.5-VL's qwen-vl-finetune demo
(`"video": PATH` and `<video>\\n` in the question), with short mp4 clips (8 frames, 4 per second, 56x56).
--blank also writes test_blank.json: the same questions over clips of empty frames (a control at chance).
Needs PyAV (`pip install av`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
QUESTION = "What colour is the moving square?"
SIZE, FRAMES, FPS, SIDE = 56, 8, 4, 16


def write_video(path: Path, frames: list[np.ndarray], fps: int = FPS) -> Path:
    """An mp4 (MPEG-4 part 2, which PyAV's own FFmpeg writes everywhere) of RGB frames."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_square(rng: random.Random, colour: str | None) -> list[np.ndarray]:
    """A square crossing the frame left to right at a random height; no square at all when colour is None."""
    shade = rng.randint(225, 250)
    top = rng.randint(4, SIZE - SIDE - 4)
    frames = []
    for i in range(FRAMES):
        frame = np.full((SIZE, SIZE, 3), shade, dtype=np.uint8)
        if colour is not None:
            left = 2 + i * (SIZE - SIDE - 4) // (FRAMES - 1)
            frame[top : top + SIDE, left : left + SIDE] = COLOURS[colour]
        frames.append(frame)
    return frames


def make_split(folder: Path, name: str, count: int, seed: int, blank: bool = False) -> Path:
    rng = random.Random(seed)
    samples = []
    for i in range(count):
        colour = rng.choice(list(COLOURS))
        path = f"videos/{name}{'_blank' if blank else ''}_{i}.mp4"
        write_video(folder / path, moving_square(rng, None if blank else colour))
        turns = [{"from": "human", "value": f"<video>\n{QUESTION}"}, {"from": "gpt", "value": colour}]
        samples.append({"id": f"{name}_{i}_colour", "video": path, "conversations": turns})
    out = folder / f"{name}{'_blank' if blank else ''}.json"
    out.write_text(json.dumps(samples, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "generated" / "videos")
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--test", type=int, default=30)
    parser.add_argument("--blank", action="store_true", help="also write the blank-frame control of the test set")
    args = parser.parse_args()
    print(make_split(args.out, "train", args.train, seed=1))
    print(make_split(args.out, "test", args.test, seed=2))
    if args.blank:
        print(make_split(args.out, "test", args.test, seed=2, blank=True))


if __name__ == "__main__":
    main()
