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
    image_max_tiles: int | None = None  # the most tiles (crops) a picture is split into; None: the model's own

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
# How a family's processor splits a picture into tiles, which --image_max_tiles bounds: InternVL's max_patches,
# Idefics3's image splitting (a grid of k x k tiles at most), Gemma 3's pan and scan (off unless asked, as in
# Gemma 3's own processor). The others' tiles are the model's too: LLaVA-NeXT and OneVision tile by grid
# pinpoints that the model's config also holds, and Llama 3.2 Vision's tile embeddings and aspect-ratio ids are
# made for its max_num_tiles (a processor with fewer numbers the aspect ratios differently: wrong ids, silently).
MAX_PATCHES, IMAGE_SPLITTING, PAN_AND_SCAN = "max-patches", "splitting", "pan"
GRID_PINPOINTS, MODEL_TILES = "grid-pinpoints", "model-tiles"
SETTABLE_TILES = (MAX_PATCHES, IMAGE_SPLITTING, PAN_AND_SCAN)


def tiles_problem(tiles: str | None, family_name: str) -> str | None:
    """Why --image_max_tiles cannot be set for a family, with the fix; None when it can."""
    if tiles in SETTABLE_TILES:
        return None
    if tiles == GRID_PINPOINTS:
        return (
            f"--image_max_tiles: {family_name} tiles by the grid pinpoints that its config.json and its "
            "preprocessor_config.json both hold (image_grid_pinpoints); edit them together in a copy of the model"
        )
    if tiles == MODEL_TILES:
        return (
            f"--image_max_tiles: {family_name}'s tiles are the model's own (its tile embeddings and aspect-ratio ids "
            "are made for its max_num_tiles); leave the flag out"
        )
    return f"--image_max_tiles: {family_name} does not split pictures into tiles; bound them with --image_max_pixels"


def configure(
    processor, options: MediaOptions, resolution: str | None = PIXEL_BUDGET, tiles: str | None = None
) -> None:
    """Put the options on the processor's image and video processors (their saved configs carry them), in the
    terms of the family's processor (`resolution` and `tiles`, tuning.families): pixel counts, the longest edge, or
    none (a fixed size of its own: the processor's settings stay as they are), and the most tiles a picture makes."""
    image = getattr(processor, "image_processor", None)
    if image is not None and resolution == PIXEL_BUDGET:
        _set_size(image, options.image_max_pixels, options.image_min_pixels, cap_at_model=True)
    elif image is not None and resolution == LONGEST_EDGE and options.image_max_pixels:
        _set_longest_edge(image, options.image_max_pixels)
    if image is not None and options.image_max_tiles is not None:
        _set_tiles(processor, tiles, options.image_max_tiles)
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


def _set_tiles(processor, tiles: str | None, most: int) -> None:
    image_processor = processor.image_processor
    if tiles not in SETTABLE_TILES:
        raise ValueError(tiles_problem(tiles, "this model"))
    if most < 1:
        raise ValueError(f"--image_max_tiles must be at least 1, got {most}")
    if tiles == MAX_PATCHES:
        image_processor.max_patches = most
        image_processor.min_patches = min(image_processor.min_patches, most)
    elif tiles == IMAGE_SPLITTING:
        image_processor.do_image_splitting = most > 1
        if most > 1:  # the picture is cut into ceil(side / tile) tiles a side: k x k at most, k = isqrt(most)
            tile = image_processor.max_image_size["longest_edge"]
            edge = min(image_processor.size["longest_edge"], tile * math.isqrt(most))
            image_processor.size = {**image_processor.size, "longest_edge": edge}
    else:
        pan = {"do_pan_and_scan": most > 1, **({"pan_and_scan_max_num_crops": most} if most > 1 else {})}
        for key, value in pan.items():
            setattr(image_processor, key, value)
        # Gemma 3's processor passes its own defaults (pan and scan off) over the image processor's settings
        processor.images_kwargs = {**getattr(processor, "images_kwargs", {}), **pan}


def tokens_per_picture(processor, width: int, height: int) -> int:
    """How many image tokens a picture of this size becomes under the processor's current settings."""
    from PIL import Image

    grid = processor.image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"]
    return int(grid[0].prod()) // processor.image_processor.merge_size**2
