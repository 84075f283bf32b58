"""Pictures and videos of a conversation -> the model's inputs, through the model's own processor.

The processor resizes pictures, samples and resizes video frames (with the options of tuning.data.media.resolution),
and says what each placeholder of the chat template becomes (so many image tokens; for Qwen3-VL, timestamps
and one block per frame): nothing here knows a model's token counts.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch

from tuning.data.conversation import Conversation, ImageRef, VideoRef
from tuning.data.media.images import ImageLimits, ImageLoadError, load_image
from tuning.data.media.videos import load_video


@dataclass
class Media:
    """The processed pictures and videos of one conversation, in order."""

    features: dict = field(default_factory=dict)  # pixel_values, image_grid_thw, pixel_values_videos, ...
    image_texts: list[str] = field(default_factory=list)  # what each image placeholder becomes
    video_texts: list[str] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each picture file
    images: list[ImageRef] = field(default_factory=list)  # the references, in order, to compute pixels from later
    videos: list[VideoRef] = field(default_factory=list)

    @property
    def image_grid(self) -> torch.Tensor | None:
        return self.features.get("image_grid_thw")

    @property
    def video_grid(self) -> torch.Tensor | None:
        return self.features.get("video_grid_thw")

    def first(self, images: int, videos: int) -> dict:
        """The features of the first `images` pictures and `videos` videos (a sample holding a prefix of them);
        pixel values only where they were computed (MediaProcessor.plan computes none). A family whose features
        have no grid (one row or tile block per picture, laid out by its processor) keeps none per sample: they
        are all computed per batch."""
        out = {}
        if images and self.image_grid is not None:
            grid = self.image_grid[:images]
            if "pixel_values" in self.features:
                out["pixel_values"] = self.features["pixel_values"][: int(grid.prod(dim=1).sum())]
            out["image_grid_thw"] = grid
        if videos and self.video_grid is not None:
            grid = self.video_grid[:videos]
            if "pixel_values_videos" in self.features:
                out["pixel_values_videos"] = self.features["pixel_values_videos"][: int(grid.prod(dim=1).sum())]
            out["video_grid_thw"] = grid
            if "second_per_grid_ts" in self.features:
                out["second_per_grid_ts"] = [float(t) for t in self.features["second_per_grid_ts"][:videos]]
        if self.image_grid is None and self.video_grid is None and self.features:
            if (images, videos) != (len(self.image_texts), len(self.video_texts)):
                raise ValueError("the features of a family without grids cannot be split by picture")
            out = dict(self.features)
        return out


class MediaProcessor:
    """Loads a conversation's pictures and videos within limits and runs them through the model's processor."""

    def __init__(
        self, processor, image_folder: str | None, limits: ImageLimits, max_images: int, why_no_videos: str = ""
    ):
        self.processor = processor
        self.image_processor = getattr(processor, "image_processor", None)
        self.video_processor = getattr(processor, "video_processor", None)
        self.why_no_videos = why_no_videos  # the family's reason for refusing videos its processor could read
        self.image_token = getattr(processor, "image_token", None)
        self.video_token = getattr(processor, "video_token", None)
        self.image_folder, self.limits, self.max_images = image_folder, limits, max_images
        self._sized: dict[tuple, tuple[str, torch.Tensor | None]] = {}  # (size, several?) -> (text, grid row)
        tokens = [t for t in (self.image_token, self.video_token) if t]
        # what the chat template writes for each picture and video (None for a text-only model)
        self.placeholder_pattern = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        # the tokens a picture or video becomes (Gemma 3 writes <start_of_image> and feeds <image_soft_token>s)
        self.token_ids = {
            kind: {i for i in getattr(processor, f"{name}_token_ids", None) or [] if i is not None}
            for kind, name in ((1, "image"), (2, "video"))
        }
        self.token_texts = (
            [processor.tokenizer.convert_ids_to_tokens(i) for ids in self.token_ids.values() for i in ids]
            if processor is not None
            else []
        )
        self.token_types_input = _token_types_input(processor)

    def token_types(self, ids: list[int]) -> list[int]:
        """1 for a picture's token, 2 for a video's, 0 for the rest: the processor's own mm_token_type_ids (GLM-4V's
        frames are picture tokens, a video's by the marks around them)."""
        own = getattr(self.processor, "create_mm_token_type_ids", None)
        if own is not None and any(self.token_ids.values()):
            return [int(t) for t in own([list(ids)])[0]]
        images, videos = self.token_ids[1], self.token_ids[2]
        return [1 if t in images else 2 if t in videos else 0 for t in ids]

    def media_tokens(self, texts: list[str]) -> int:
        """How many picture and video tokens the placeholder texts hold."""
        return sum(text.count(token) for text in texts for token in self.token_texts)

    def resized_sizes(self, media: Media) -> list[tuple[int, int]]:
        """(width, height) of each picture as the model sees it, after the processor's resize."""
        if media.image_grid is None:
            return []
        patch = self.image_processor.patch_size
        return [(int(w) * patch, int(h) * patch) for _, h, w in media.image_grid.tolist()]

    def seen_size(self, ref: ImageRef) -> tuple[int, int]:
        """(width, height) of a picture as the model sees it: loaded within the limits, resized by the processor."""
        _, grid = self._by_size(load_image(ref, self.image_folder, self.limits))
        return self.resized_sizes(Media({"image_grid_thw": grid}))[0]

    def process(self, conv: Conversation) -> Media:
        """Every picture and video loaded, checked and run through the processor, pixel values included."""
        return self._process(conv, pixels=True)

    def plan(self, conv: Conversation) -> Media:
        """What `process` gives but the pixel values: each picture is loaded (so a file that cannot be read fails
        now) and its token text and grid found from its size, run through the processor once per distinct size
        (a resize depends on the size alone); a video is processed and its pixels let go. `pixels` computes them
        per batch, from `Media.images` and `Media.videos`."""
        return self._process(conv, pixels=False)

    def pixels(self, images: list[ImageRef], videos: list[VideoRef], grids: dict, tokens: int) -> dict:
        """The pixel features of a sample's pictures and videos, computed now, by the same loaders, limits and
        processor as at encoding; `grids` (image_grid_thw, video_grid_thw as encoded) must come out the same, and
        the pictures must become the `tokens` picture and video tokens the sample holds."""
        loaded = [load_image(ref, self.image_folder, self.limits) for ref in images]
        media = self._run(loaded, [self.load_video(ref) for ref in videos], [image.size for image in loaded])
        if (now := self.media_tokens(media.image_texts + media.video_texts)) != tokens:
            names = ", ".join(_name(ref) for ref in [*images, *videos])
            raise ImageLoadError(
                f"a picture or video of {names} changed size since the data was encoded (it becomes {now} tokens, "
                f"{tokens} when encoded); restore the file, or encode again (change or clear --dataset_cache_dir)"
            )
        for key in ("image_grid_thw", "video_grid_thw"):
            if key in grids and not torch.equal(media.features[key], torch.as_tensor(grids[key])):
                names = ", ".join(_name(ref) for ref in [*images, *videos])
                raise ImageLoadError(
                    f"a picture or video of {names} changed size since the data was encoded ({key} "
                    f"{media.features[key].tolist()}, encoded as {torch.as_tensor(grids[key]).tolist()}); "
                    "restore the file, or encode again (change or clear --dataset_cache_dir)"
                )
        return media.features

    def _process(self, conv: Conversation, pixels: bool) -> Media:
        found = [(part, i) for i, m in enumerate(conv.messages) for part in m.media]
        if not found:
            return Media()
        if len(found) > self.max_images:
            raise conv.error(
                f"{len(found)} images and videos, more than the {self.max_images} allowed per sample",
                "split the conversation, or raise --max_images_per_sample",
                found[self.max_images][1],
                "content",
            )
        images, videos, sizes = [], [], []
        for part, index in found:
            try:
                if isinstance(part, ImageRef):
                    self._need(conv, self.image_processor, "images", index)
                    image = load_image(part, self.image_folder, self.limits)
                    images.append(image)
                    sizes.append(image.size)
                else:
                    self._need(conv, self.video_processor, "videos", index)
                    videos.append(self.load_video(part))
            except ImageLoadError as e:
                raise conv.error(str(e), "", index, "content") from None
        refs = ([p for p, _ in found if isinstance(p, ImageRef)], [p for p, _ in found if isinstance(p, VideoRef)])
        try:
            media = self._run(images, videos, sizes) if pixels else self._planned(images, videos, sizes)
        except (ValueError, RuntimeError) as e:  # a video the processor cannot take (too few frames, ...)
            raise conv.error(
                f"the processor refused the pictures or videos ({e})", "", found[0][1], "content"
            ) from None
        media.images, media.videos = refs
        return media

    def _planned(self, images: list, videos: list, sizes: list) -> Media:
        """Media without pixel values: pictures through the per-size memo, videos processed and let go."""
        per_image = [self._by_size(image, len(images)) for image in images]
        media = self._run([], videos, []) if videos else Media()
        features = {k: v for k, v in media.features.items() if k == "video_grid_thw" or k == "second_per_grid_ts"}
        if per_image and per_image[0][1] is not None:
            features["image_grid_thw"] = torch.cat([grid for _, grid in per_image])
        return Media(features, [text for text, _ in per_image], media.video_texts, sizes)

    def _by_size(self, image, pictures: int = 1) -> tuple[str, torch.Tensor | None]:
        """(the placeholder's text, the grid row or None) of one picture, computed once per size and per count of
        pictures in its sample (LLaVA-OneVision tiles a picture alone, and not one among several)."""
        key = (image.size, pictures > 1)
        if key not in self._sized:
            copies = min(pictures, 2)
            run = self._run([image] * copies, [], [image.size] * copies)
            self._sized[key] = (run.image_texts[0], None if run.image_grid is None else run.image_grid[:1])
        return self._sized[key]

    def _need(self, conv: Conversation, sub_processor, what: str, index: int) -> None:
        if what == "videos" and self.why_no_videos:
            raise conv.error(
                f"the sample has videos, which this model's family does not train yet: {self.why_no_videos}",
                "give its videos as pictures (frames), or remove them",
                index,
                "content",
            )
        if sub_processor is None:
            raise conv.error(
                f"the sample has {what} but the model takes none (it is text-only, or has no {what[:-1]} processor)",
                f"use a vision-language model that reads {what}, or remove them",
                index,
                "content",
            )

    def load_video(self, ref: VideoRef):
        # the processor's fps as tuning.data.media.resolution set it, else the usual 2 frames a second
        fps = getattr(self.video_processor, "fps", None) or 2.0
        sample = functools.partial(self.video_processor.sample_frames, fps=fps)
        return load_video(ref, sample, fps, self.image_folder, self.limits)

    def _run(self, images: list, videos: list, sizes: list) -> Media:
        text = (self.image_token or "") * len(images) + (self.video_token or "") * len(videos)
        kwargs = {}
        if videos:
            kwargs = {
                "videos": [frames for frames, _ in videos],
                "video_metadata": [metadata for _, metadata in videos],
                "do_sample_frames": False,  # sampled already, by the same processor, before decoding
            }
        out = self.processor(
            text=[text],
            images=[images] if images else None,  # nested: the pictures of one sample
            return_text_replacement_offsets=True,
            return_tensors="pt",
            **kwargs,
        )
        features = {k: v for k, v in out.items() if k not in _TEXT_OUTPUTS}
        if "text_replacement_offsets" not in out:
            # a processor that writes no replacements leaves each placeholder as it is (Mllama: the pictures go
            # in through cross-attention, one token each in the text)
            texts = ([self.image_token] * len(images), [self.video_token] * len(videos))
            return Media(features, *texts, original_sizes=sizes)
        replacements = out["text_replacement_offsets"][0]
        return Media(
            features=features,
            image_texts=[r["replacement"] for r in replacements if r["type"] == "image"],
            video_texts=[r["replacement"] for r in replacements if r["type"] == "video"],
            original_sizes=sizes,
        )

    def blank_picture(self) -> Media:
        """One grey picture of the smallest size the processor keeps (the placeholder of picture-less batches)."""
        from PIL import Image

        patch, merge = getattr(self.image_processor, "patch_size", None), getattr(self.image_processor, "merge_size", 1)
        side = patch * merge if isinstance(patch, int) and isinstance(merge, int) else 32
        return self._run([Image.new("RGB", (side, side), (128, 128, 128))], [], [(side, side)])


def _token_types_input(processor) -> str | None:
    """The model input that marks picture tokens, where the model takes one: mm_token_type_ids (Qwen-VL, GLM-4V),
    or token_type_ids where the processor adds it to what its tokenizer returns (Gemma 3: a picture's tokens attend
    to each other both ways); a tokenizer's own token_type_ids are segment ids, never picture marks."""
    names = getattr(processor, "model_input_names", None) or []
    if "mm_token_type_ids" in names:
        return "mm_token_type_ids"
    tokenizer_names = getattr(getattr(processor, "tokenizer", None), "model_input_names", None) or []
    return "token_type_ids" if "token_type_ids" in names and "token_type_ids" not in tokenizer_names else None


# what the processor returns for the placeholder text it was given, not for the sample
_TEXT_OUTPUTS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "token_type_ids",
    "cross_attention_mask",  # Mllama's: made from the sample's own ids (tuning.families.CrossAttentionMask)
    "text_replacement_offsets",
)


def _name(ref: ImageRef | VideoRef) -> str:
    source = ref.source
    if isinstance(source, bytes):
        return f"an embedded picture ({len(source)} bytes)"
    if isinstance(source, tuple):
        return f"the frames {source[0]}..."
    return source if len(source) < 120 else source[:60] + "..."
