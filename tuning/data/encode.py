"""Conversation -> training samples: input_ids, labels, pixel_values, image_grid_thw.

The text of a sample is the model's own chat template, split into turns by tuning.data.template (each
assistant turn is trained exactly as the model sees it at inference). The whole text is tokenized once and
the labels are placed through the tokenizer's character offsets, so the ids are exactly those of
`apply_chat_template`, whatever the tokenizer (byte-level BPE or SentencePiece), and only each assistant
turn's target (reasoning, content, tool calls, end-of-turn token) is supervised.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

import torch

from tuning.data import grounding
from tuning.data.conversation import BoxRef, Conversation, ImageRef, VideoRef
from tuning.data.images import ImageLimits, ImageLoadError, load_image
from tuning.data.template import ChatTemplate, Rendered, TemplateError

IGNORE_INDEX = -100
OVERLONG_POLICIES = ("turns", "drop", "error")


@dataclass
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    mm_token_type_ids: list[int] | None = None
    truncated: bool = False

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else len(self.image_grid_thw)

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class DroppedSample(Exception):
    """A sample that is valid but cannot be used (for example nothing supervised fits the length)."""

    def __init__(self, sample_id: str, reason: str):
        self.sample_id, self.reason = sample_id, reason
        super().__init__(f"sample {sample_id}: {reason}")


@dataclass
class _Tokens:
    ids: list[int]
    labels: list[int]
    cuts: list[tuple[int, int]]  # (token index after a supervised turn, pictures before it)


class Encoder:
    """Encodes conversations for one model: its tokenizer, its processor (for images) and its conventions."""

    def __init__(
        self,
        tokenizer,
        processor=None,
        *,
        model_type: str = "",
        max_length: int = 2048,
        grounding_format: str = "auto",
        overlong: str = "turns",
        image_folder: str | None = None,
        image_limits: ImageLimits = ImageLimits(),
        max_images: int = 32,
        chat_template: str | None = None,
        template_kwargs: dict | None = None,
        train_on_last_turn_only: bool = False,
    ):
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong policy {overlong!r} is not one of {', '.join(OVERLONG_POLICIES)}")
        self.tokenizer = tokenizer
        self.processor = processor
        self.image_processor = getattr(processor, "image_processor", None)
        self.max_length = max_length
        self.overlong = overlong
        self.image_folder = image_folder
        self.image_limits = image_limits
        self.max_images = max_images
        self.train_on_last_turn_only = train_on_last_turn_only
        vocab = tokenizer.get_vocab()
        self.convention = (
            grounding.convention_for(model_type, vocab) if grounding_format == "auto" else grounding_format
        )
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token) if self.image_token else None
        if chat_template is None and tokenizer.chat_template is None:
            raise ValueError(
                f"the tokenizer of {tokenizer.name_or_path!r} has no chat template; use a chat model, "
                "or give one with --chat_template FILE.jinja"
            )
        self.template = ChatTemplate(tokenizer, chat_template, template_kwargs)

    # -- public -----------------------------------------------------------------------------------

    def encode(self, conv: Conversation) -> list[Sample]:
        """Every training sample of a conversation: one, or several where the template rewrites history.
        Raises DroppedSample when none fits --model_max_length."""
        samples, dropped = self.encode_parts(conv)
        if not samples:
            raise dropped[0]
        return samples

    def encode_parts(self, conv: Conversation) -> tuple[list[Sample], list[DroppedSample]]:
        """(the samples that fit, the ones dropped for their length), so that the report names each."""
        if conv.pretrain_text is not None:
            try:
                return [self._encode_pretrain(conv)], []
            except DroppedSample as e:
                return [], [e]
        if conv.videos:
            raise conv.error("the sample has a video, and video input is not supported yet", "remove the video")
        images = self._load_images(conv)
        pixel_values, grid = self._process_images([image for image, _ in images])
        original = [image.size for image, _ in images]
        messages = self._template_messages(conv, original, self._resized_sizes(grid))
        try:
            rendered = self.template.samples(
                messages, self._trained_turns(conv), tools=conv.tools, add_vision_id=conv.add_vision_id
            )
        except TemplateError as e:
            raise conv.error(e.problem, e.fix, e.message_index) from None
        if not rendered:
            raise conv.error("no assistant turn is trained", "drop --train_on_last_turn_only, or mark a turn trained")
        samples, dropped = [], []
        for j, part in enumerate(rendered):
            sample_id = conv.id if len(rendered) == 1 else f"{conv.id}#{j + 1}"
            try:
                samples.append(self._sample(conv, sample_id, part, pixel_values, grid))
            except DroppedSample as e:
                dropped.append(e)
        return samples, dropped

    def placeholder_image_sample(self) -> Sample:
        """One blank picture and nothing to learn (all labels -100): added to a picture-less packed batch so
        that every rank's vision tower and projector take part in the step (DeepSpeed reduces gradients of
        the same parameters on every rank). It is its own packed sample, so it changes no loss."""
        from PIL import Image

        side = self.image_processor.patch_size * self.image_processor.merge_size
        pixel_values, grid = self._process_images([Image.new("RGB", (side, side), (128, 128, 128))])
        vocab = self.tokenizer.get_vocab()
        start, end = (t for t in ("<|vision_start|>", "<|vision_end|>") if t in vocab)
        text = start + self.image_token * self._image_token_count(grid[0]) + end
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        types = [int(t == self.image_token_id) for t in ids]
        return Sample("placeholder-image", ids, [IGNORE_INDEX] * len(ids), pixel_values, grid, types)

    def check_images(self, conv: Conversation) -> None:
        """Open every image of a conversation (used by the up-front validation of lazy datasets)."""
        self._load_images(conv)

    def template_messages(self, conv: Conversation) -> list[dict]:
        """The messages as the chat template takes them (for the parity tests and for inspection)."""
        images = self._load_images(conv)
        grid = self._process_images([image for image, _ in images])[1]
        return self._template_messages(conv, [image.size for image, _ in images], self._resized_sizes(grid))

    # -- rendering --------------------------------------------------------------------------------

    def _trained_turns(self, conv: Conversation) -> list[int]:
        assistants = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
        if self.train_on_last_turn_only:
            assistants = assistants[-1:]
        return [i for i in assistants if conv.messages[i].trained]

    def _template_messages(self, conv: Conversation, original: list, resized: list) -> list[dict]:
        """Messages in the form the chat template takes, with grounding written in the model's convention."""
        messages, image_index, last_size = [], 0, None
        for i, message in enumerate(conv.messages):
            parts = []
            for part in message.parts:
                if isinstance(part, ImageRef):
                    last_size = resized[image_index] if resized else None
                    image_index += 1
                    parts.append({"type": "image"})
                    continue
                if isinstance(part, VideoRef):
                    parts.append({"type": "video"})
                    continue
                try:
                    text = self._box_text(part, original, resized) if isinstance(part, BoxRef) else part
                    text = grounding.convert(text, self.convention, last_size)
                except grounding.GroundingError as e:
                    raise conv.error(str(e), "fix the <ref>/<box> tags", i, "content") from None
                parts.append({"type": "text", "text": text})
            messages.append(_template_message(message, parts))
        return messages

    def _box_text(self, box: BoxRef, original: list, resized: list) -> str:
        """An ms-swift box as our [0,1000) <box> text, normalised by the size of the image it refers to."""
        if box.space == "pixels":
            if box.image_index >= len(original):
                raise grounding.GroundingError(f"a box refers to image {box.image_index}, and there is no such image")
            width, height = original[box.image_index]
            scale = (1000 / width, 1000 / height) * 2
            # a box may touch the far edge of its image: 1000 is then the last coordinate inside it
            coords = [min(c * s, 999) if c * s <= 1000 else c * s for c, s in zip(box.coords, scale, strict=True)]
        else:
            factor = 1000 if box.space == "norm1" else 1
            coords = [c * factor for c in box.coords]
        return grounding.box_tag(coords)

    # -- images -----------------------------------------------------------------------------------

    def _load_images(self, conv: Conversation) -> list[tuple[object, int]]:
        found = [(ref, i) for i, m in enumerate(conv.messages) for ref in m.images]
        if len(found) > self.max_images:
            raise conv.error(
                f"{len(found)} images, more than the {self.max_images} allowed per sample",
                "split the conversation, or raise --max_images_per_sample",
                found[self.max_images][1],
                "content",
            )
        if found and self.image_processor is None:
            raise conv.error(
                "the sample has images but the model is text-only",
                "use a vision-language model, or remove the images",
                found[0][1],
                "content",
            )
        loaded = []
        for ref, index in found:
            try:
                loaded.append((load_image(ref, self.image_folder, self.image_limits), index))
            except ImageLoadError as e:
                raise conv.error(str(e), "", index, "content") from None
        return loaded

    def _resized_sizes(self, grid: torch.Tensor | None) -> list[tuple[int, int]]:
        """(width, height) of each picture as the model sees it, after the processor's resize."""
        if grid is None:
            return []
        patch = self.image_processor.patch_size
        return [(int(w) * patch, int(h) * patch) for _, h, w in grid.tolist()]

    def _process_images(self, images: list):
        if not images:
            return None, None
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def _image_token_count(self, grid_row: torch.Tensor) -> int:
        return int(grid_row.prod()) // self.image_processor.merge_size**2

    # -- tokens -----------------------------------------------------------------------------------

    def _sample(self, conv: Conversation, sample_id: str, rendered: Rendered, pixel_values, grid) -> Sample:
        num_images = sum(len(m.images) for m in conv.messages[: rendered.num_messages])
        counts = [self._image_token_count(row) for row in grid[:num_images]] if num_images else []
        tokens = self._tokenize(conv, rendered, counts)
        if num_images:
            rows = int(grid[:num_images].prod(dim=1).sum())
            pixel_values, grid = pixel_values[:rows], grid[:num_images]
        else:
            pixel_values, grid = None, None
        sample = Sample(sample_id, tokens.ids, tokens.labels, pixel_values, grid)
        if len(sample.input_ids) > self.max_length:
            sample = self._truncate(conv, sample, tokens.cuts)
        if self.image_token_id is not None and sample.num_images:
            sample.mm_token_type_ids = [int(t == self.image_token_id) for t in sample.input_ids]
        return sample

    def _expand_images(self, conv: Conversation, segments, counts: list[int]) -> list[str]:
        """Each image placeholder becomes as many image tokens as the picture has patches after merging."""
        pending = iter(counts)
        texts = []
        for segment in segments:
            text = segment.text
            if self.image_token and self.image_token in text:
                pieces = text.split(self.image_token)
                try:
                    text = pieces[0] + "".join(self.image_token * next(pending) + piece for piece in pieces[1:])
                except StopIteration:
                    raise self._images_mismatch(conv, len(counts)) from None
            texts.append(text)
        if next(pending, None) is not None:
            raise self._images_mismatch(conv, len(counts))
        return texts

    def _images_mismatch(self, conv: Conversation, expected: int):
        return conv.error(
            f"the chat template of {self.template.name} does not write one image placeholder per picture "
            f"({expected} pictures)",
            "use the model's own chat template, or one that renders every image part (--chat_template)",
        )

    def _tokenize(self, conv: Conversation, rendered: Rendered, counts: list[int]) -> _Tokens:
        """The whole text tokenized once; each token takes the label of the segment its characters are in."""
        texts = self._expand_images(conv, rendered.segments, counts)
        starts = list(itertools.accumulate(map(len, texts), initial=0))
        encoded = self.tokenizer("".join(texts), add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        labels, segment_of_token = [], []
        last = len(rendered.segments) - 1
        for token, (begin, end) in zip(ids, offsets, strict=True):
            segment = min(bisect.bisect_right(starts, begin) - 1, last)
            if end > starts[segment + 1]:
                raise self._straddle(conv, rendered, texts, segment)
            segment_of_token.append(segment)
            labels.append(token if rendered.segments[segment].supervised else IGNORE_INDEX)
        per_segment = (s.text.count(self.image_token) if self.image_token else 0 for s in rendered.segments)
        pictures = list(itertools.accumulate(per_segment))
        cuts = [(bisect.bisect_right(segment_of_token, i), pictures[i]) for i in _turn_ends(rendered.segments)]
        return _Tokens(ids, labels, cuts)

    def _straddle(self, conv: Conversation, rendered: Rendered, texts: list[str], segment: int):
        left, right = texts[segment][-20:], texts[segment + 1][:20]
        index = rendered.segments[segment + 1].message_index
        return conv.error(
            f"the tokenizer merges text across the start or end of a trained turn ({left!r} | {right!r}), so the "
            "turn cannot be supervised exactly; usually the message begins or ends with whitespace",
            "strip leading and trailing whitespace from the messages",
            index,
        )

    def _truncate(self, conv: Conversation, sample: Sample, cuts: list[tuple[int, int]]) -> Sample:
        length = len(sample.input_ids)
        if self.overlong == "error":
            raise conv.error(
                f"{length} tokens, over --model_max_length {self.max_length}",
                "raise --model_max_length, shorten the sample, or use --overlong turns|drop",
            )
        if self.overlong == "drop":
            raise DroppedSample(sample.id, f"{length} tokens > model_max_length {self.max_length}")
        # Keep the longest run of whole turns that fits and ends after a trained turn, so no image is ever cut
        # and every kept target is complete.
        fitting = [(end, pictures) for end, pictures in cuts if end <= self.max_length]
        if not fitting:
            raise DroppedSample(sample.id, f"{length} tokens and the first answer does not fit in {self.max_length}")
        keep, num_images = fitting[-1]
        pixel_values, grid = sample.pixel_values, sample.image_grid_thw
        if grid is not None:
            rows = int(grid[:num_images].prod(dim=1).sum())
            pixel_values, grid = (pixel_values[:rows], grid[:num_images]) if num_images else (None, None)
        return Sample(sample.id, sample.input_ids[:keep], sample.labels[:keep], pixel_values, grid, truncated=True)

    def _encode_pretrain(self, conv: Conversation) -> Sample:
        vocab = self.tokenizer.get_vocab()
        end = "<|endoftext|>" if "<|endoftext|>" in vocab else self.tokenizer.eos_token
        ids = self.tokenizer(conv.pretrain_text + end, add_special_tokens=False)["input_ids"]
        truncated = len(ids) > self.max_length
        if truncated and self.overlong != "turns":
            if self.overlong == "drop":
                raise DroppedSample(conv.id, f"{len(ids)} tokens > model_max_length {self.max_length}")
            raise conv.error(f"{len(ids)} tokens, over --model_max_length {self.max_length}", "shorten the text")
        ids = ids[: self.max_length]
        return Sample(conv.id, ids, list(ids), truncated=truncated)


def _turn_ends(segments) -> list[int]:
    """Segments after which a sample may end: a trained turn's target, and the text that closes it."""
    ends = []
    for i, segment in enumerate(segments):
        closing = (
            not segment.supervised
            and i > 0
            and segments[i - 1].supervised
            and segments[i - 1].message_index == segment.message_index
        )
        if segment.supervised or closing:
            ends.append(i)
    return ends


def _template_message(message, parts: list[dict]) -> dict:
    """One message as a chat template takes it: a string where there is no picture (text-only templates such
    as Qwen3's read only strings), parts where there is, and the tool and reasoning fields it carries."""
    has_media = any(p["type"] != "text" for p in parts)
    content = parts if has_media else "".join(p["text"] for p in parts)
    out: dict = {"role": message.role, "content": content}
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.reasoning:
        out["reasoning_content"] = message.reasoning
    for key in ("name", "tool_call_id"):
        if getattr(message, key):
            out[key] = getattr(message, key)
    return out
