"""Conversation -> input_ids, labels, pixel_values, image_grid_thw.

The ids are the model's own chat template, rendered one message at a time and appended as
(text, supervised?) segments: whatever the template writes around a message (role headers, the
default system prompt, "Picture N:" labels, image placeholders) is unsupervised; an assistant
message's content and its end-of-turn token are supervised. So the ids equal what
`apply_chat_template` gives at inference, and the loss lands on assistant content only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tuning.data import grounding
from tuning.data.errors import DataError
from tuning.data.formats import Conversation, ImageRef
from tuning.data.images import ImageLimits, ImageLoadError, load_image

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
class Segment:
    text: str
    supervised: bool
    message_index: int


@dataclass
class _Rendered:
    segments: list[Segment] = field(default_factory=list)
    image_message: list[int] = field(default_factory=list)  # message index of each image, in order


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
        vocab = tokenizer.get_vocab()
        self.convention = (
            grounding.convention_for(model_type, vocab) if grounding_format == "auto" else grounding_format
        )
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token) if self.image_token else None
        if tokenizer.chat_template is None:
            raise ValueError(
                f"the tokenizer of {tokenizer.name_or_path!r} has no chat template; use a chat model, "
                "or give the tokenizer a template (tokenizer.chat_template) before fine-tuning"
            )

    # -- public -----------------------------------------------------------------------------------

    def encode(self, conv: Conversation) -> Sample:
        if conv.pretrain_text is not None:
            return self._encode_pretrain(conv)
        images = self._load_images(conv)
        pixel_values, grid = self._process_images([image for image, _ in images])
        rendered = self._render(conv, self._resized_sizes(grid))
        rendered.image_message = [index for _, index in images]
        return self._tokenize(conv, rendered, pixel_values, grid)

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

    # -- rendering --------------------------------------------------------------------------------

    def _template_messages(self, conv: Conversation, sizes: list[tuple[int, int]]) -> list[dict]:
        """Messages in the form the chat template takes, with grounding written in the model's convention."""
        has_images = bool(conv.images)
        messages, image_index, last_size = [], 0, None
        for i, message in enumerate(conv.messages):
            parts = []
            for part in message.parts:
                if isinstance(part, ImageRef):
                    last_size = sizes[image_index] if sizes else None
                    image_index += 1
                    parts.append({"type": "image"})
                    continue
                try:
                    text = grounding.convert(part, self.convention, last_size)
                except grounding.GroundingError as e:
                    raise conv.error(str(e), "fix the <ref>/<box> tags", i, "content") from None
                parts.append({"type": "text", "text": text})
            # Text-only templates (Qwen2-Instruct) take a string; list parts only where images are.
            content = parts if has_images else "".join(p["text"] for p in parts)
            messages.append({"role": message.role, "content": content})
        return messages

    def _apply(self, messages: list[dict], conv: Conversation, generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, add_vision_id=conv.add_vision_id
        )

    def _render(self, conv: Conversation, sizes: list[tuple[int, int]]) -> _Rendered:
        rendered = _Rendered()
        messages = self._template_messages(conv, sizes)
        previous = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                full = self._apply(messages[: i + 1], conv)
                rendered.segments.append(Segment(self._after(previous, full, conv, i), False, i))
                previous = full
                continue
            with_header = self._apply(messages[:i], conv, generation_prompt=True) if i else None
            full = self._apply(messages[: i + 1], conv)
            if with_header is None:  # an assistant turn first: the header is whatever precedes its content
                content = self._content_text(message)
                with_header = full[: full.find(content)] if content in full else full
            header = self._after(previous, with_header, conv, i)
            body = self._after(with_header, full, conv, i)
            content = self._content_text(message)
            if not body.startswith(content):
                raise self._no_split(conv, i, "the template changes the assistant content")
            tail = body[len(content) :]
            end = self._end_of_turn(tail)
            if end is None:
                raise self._no_split(conv, i, "no end-of-turn token follows the assistant content")
            rendered.segments += [
                Segment(header, False, i),
                Segment(content + end, True, i),
                Segment(tail[len(end) :], False, i),
            ]
            previous = full
        return rendered

    @staticmethod
    def _content_text(message: dict) -> str:
        content = message["content"]
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)

    def _after(self, prefix: str, full: str, conv: Conversation, index: int) -> str:
        if not full.startswith(prefix):
            raise self._no_split(conv, index, "rendering one more message rewrites the earlier ones")
        return full[len(prefix) :]

    def _no_split(self, conv: Conversation, index: int, why: str) -> DataError:
        model = getattr(self.tokenizer, "name_or_path", "this model")
        return conv.error(
            f"the chat template of {model!r} cannot be split into turns ({why})",
            "use a template that renders each message in turn (ChatML does), or report the model",
            index,
        )

    def _end_of_turn(self, tail: str) -> str | None:
        for token in sorted(self.tokenizer.all_special_tokens, key=len, reverse=True):
            if tail.startswith(token):
                return token
        return None

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

    def _tokenize(self, conv: Conversation, rendered: _Rendered, pixel_values, grid) -> Sample:
        counts = iter([self._image_token_count(row) for row in grid] if grid is not None else [])
        ids, labels, message_of_token, texts = [], [], [], []
        for segment in rendered.segments:
            text = segment.text
            if self.image_token and self.image_token in text:
                pieces = text.split(self.image_token)
                text = pieces[0] + "".join(self.image_token * next(counts) + piece for piece in pieces[1:])
            texts.append(text)
            seg_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += seg_ids
            labels += seg_ids if segment.supervised else [IGNORE_INDEX] * len(seg_ids)
            message_of_token += [segment.message_index] * len(seg_ids)
        self._check_parity(conv, ids, "".join(texts))
        sample = Sample(conv.id, ids, labels, pixel_values, grid)
        if len(ids) > self.max_length:
            sample = self._truncate(conv, sample, message_of_token, rendered)
        if self.image_token_id is not None and sample.num_images:
            sample.mm_token_type_ids = [int(t == self.image_token_id) for t in sample.input_ids]
        return sample

    def _check_parity(self, conv: Conversation, ids: list[int], joined: str) -> None:
        """The appended segments must tokenize exactly like the whole text (they do unless a merge crosses a turn)."""
        whole = self.tokenizer(joined, add_special_tokens=False)["input_ids"]
        if whole != ids:
            at = next(
                (k for k, (a, b) in enumerate(zip(whole, ids, strict=False)) if a != b), min(len(whole), len(ids))
            )
            raise conv.error(
                f"tokens differ from the whole conversation's tokens at position {at}: a turn starts or ends "
                "with whitespace that the tokenizer merges with the template's own newline",
                "strip leading and trailing whitespace from the messages",
            )

    def _truncate(self, conv: Conversation, sample: Sample, message_of_token: list[int], rendered) -> Sample:
        length = len(sample.input_ids)
        if self.overlong == "error":
            raise conv.error(
                f"{length} tokens, over --model_max_length {self.max_length}",
                "raise --model_max_length, shorten the sample, or use --overlong turns|drop",
            )
        if self.overlong == "drop":
            raise DroppedSample(conv.id, f"{length} tokens > model_max_length {self.max_length}")
        # Keep the longest run of whole messages that fits and ends with an assistant turn, so no image
        # is ever cut and every kept assistant turn is complete.
        keep = 0
        for end in range(1, length + 1):
            ends_turn = end == length or message_of_token[end] != message_of_token[end - 1]
            is_assistant = conv.messages[message_of_token[end - 1]].role == "assistant"
            if end <= self.max_length and ends_turn and is_assistant:
                keep = end
        if keep == 0 or not any(label != IGNORE_INDEX for label in sample.labels[:keep]):
            raise DroppedSample(conv.id, f"{length} tokens and the first answer does not fit in {self.max_length}")
        kept_messages = message_of_token[keep - 1] + 1
        num_images = sum(1 for m in rendered.image_message if m < kept_messages)
        pixel_values, grid = sample.pixel_values, sample.image_grid_thw
        if grid is not None:
            rows = int(grid[:num_images].prod(dim=1).sum())
            pixel_values, grid = (pixel_values[:rows], grid[:num_images]) if num_images else (None, None)
        return Sample(conv.id, sample.input_ids[:keep], sample.labels[:keep], pixel_values, grid, truncated=True)

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
