"""How large pictures and videos reach the model: the resolution and frame options, put on the model's own
processor (which then resizes and samples), and saved beside the trained model so inference does the same.

On a GPU, image tokens are the memory: a real Qwen2.5-VL processor keeps up to 12.8 M pixels per picture, so
a 12-megapixel phone photo becomes about 15,500 tokens. The default budget, 768x768 pixels (LLaMA-Factory's
default too), makes it about 700.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_IMAGE_MAX_PIXELS = 768 * 768
DEFAULT_VIDEO_MAX_PIXELS = 256 * 256
DEFAULT_VIDEO_MIN_PIXELS = 16 * 16
SAVED_NAME = "media_options.json"


@dataclass
class MediaOptions:
    """`None` for a pixel bound keeps the model's own; the image budget never raises the model's own maximum."""

    image_max_pixels: int | None = DEFAULT_IMAGE_MAX_PIXELS
    image_min_pixels: int | None = None
    video_max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS
    video_min_pixels: int | None = DEFAULT_VIDEO_MIN_PIXELS
    video_fps: float = 2.0
    video_maxlen: int = 128

    def save(self, folder: str | Path) -> None:
        Path(folder, SAVED_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def saved_in(cls, *folders: str | Path | None) -> MediaOptions | None:
        """The options a trained model was saved with (its folder, or its adapter's), if any."""
        for folder in folders:
            if folder and Path(folder, SAVED_NAME).is_file():
                return cls(**json.loads(Path(folder, SAVED_NAME).read_text()))
        return None


def pixels(value: str | int | None) -> int | None:
    """A pixel count from a flag: a number (also written 768*768), or 'model' for the model's own setting."""
    if value is None or isinstance(value, int):
        return value
    if value.strip().lower() == "model":
        return None
    try:
        factors = [int(part) for part in value.replace("x", "*").split("*")]
    except ValueError:
        raise ValueError(
            f"{value!r} is not a pixel count: write a number such as 589824 or 768*768, or 'model'"
        ) from None
    total = 1
    for factor in factors:
        total *= factor
    return total


PIXEL_BUDGET, LONGEST_EDGE = "pixel-budget", "longest-edge"  # what a family's processor size holds


def configure(processor, options: MediaOptions, resolution: str | None = PIXEL_BUDGET) -> None:
    """Put the options on the processor's image and video processors (their saved configs carry them), in the
    terms of the family's processor (`resolution`, tuning.families): pixel counts, the longest edge, or none (a
    fixed size or tiles of its own: the processor's settings stay as they are)."""
    image = getattr(processor, "image_processor", None)
    if image is not None and resolution == PIXEL_BUDGET:
        _set_size(image, options.image_max_pixels, options.image_min_pixels, cap_at_model=True)
    elif image is not None and resolution == LONGEST_EDGE and options.image_max_pixels:
        _set_longest_edge(image, options.image_max_pixels)
    video = getattr(processor, "video_processor", None)
    if video is not None:
        if resolution == PIXEL_BUDGET:
            _set_size(video, options.video_max_pixels, options.video_min_pixels, cap_at_model=False)
        video.fps = options.video_fps
        video.max_frames = options.video_maxlen
        video.min_frames = min(getattr(video, "min_frames", 1) or 1, options.video_maxlen)
        if hasattr(video, "cap_pixels_per_frame"):
            video.cap_pixels_per_frame = True  # the reference (qwen-vl-utils) behaviour


def _set_size(sub_processor, max_pixels: int | None, min_pixels: int | None, cap_at_model: bool) -> None:
    size = dict(sub_processor.size) if sub_processor.size is not None else {}
    model_max, model_min = size.get("longest_edge"), size.get("shortest_edge")
    if max_pixels is not None:
        size["longest_edge"] = min(max_pixels, model_max) if cap_at_model and model_max else max_pixels
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    elif model_min is not None and size.get("longest_edge") is not None:
        size["shortest_edge"] = min(model_min, size["longest_edge"])
    sub_processor.size = {k: v for k, v in size.items() if k in ("shortest_edge", "longest_edge") and v is not None}


def _set_longest_edge(image_processor, max_pixels: int) -> None:
    """A budget of pixels as the longest edge of a square of that many pixels, never above the model's own."""
    size = dict(image_processor.size or {})
    edge = math.isqrt(max_pixels)
    if size.get("longest_edge"):
        size["longest_edge"] = min(edge, size["longest_edge"])
        image_processor.size = size


def tokens_per_picture(processor, width: int, height: int) -> int:
    """How many image tokens a picture of this size becomes under the processor's current settings."""
    from PIL import Image

    grid = processor.image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"]
    return int(grid[0].prod()) // processor.image_processor.merge_size**2
