"""Conversation -> training samples: input_ids, labels, and the pictures and videos the model reads.

The text of a sample is the model's own chat template, split into turns by tuning.data.template (each
assistant turn is trained exactly as the model sees it at inference). The whole text is tokenized once and
the labels are placed through the tokenizer's character offsets, so the ids are exactly those of
`apply_chat_template`, whatever the tokenizer (byte-level BPE or SentencePiece), and only each assistant
turn's target (reasoning, content, tool calls, end-of-turn token) is supervised.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from tuning.data import grounding
from tuning.data.conversation import BoxRef, Conversation, ImageRef, VideoRef
from tuning.data.errors import DataError
from tuning.data.media.images import ImageLimits, ImageLoadError
from tuning.data.media.processor import MediaProcessor
from tuning.data.template import ChatTemplate, Rendered, Segment, TemplateError
from tuning.families import (
    AUTO,
    GENERIC,
    Family,
    GroundingStyle,
    cross_attention_mask,
    end_of_text,
    grounding_style,
    require_support,
)

IGNORE_INDEX = -100
OVERLONG_POLICIES = ("turns", "drop", "error")


@dataclass
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]
    # image_grid_thw, video_grid_thw, second_per_grid_ts; pixel_values(_videos) once computed (Encoder.pixels)
    media: dict = field(default_factory=dict)
    mm_token_type_ids: list[int] | None = None  # 1 for image tokens, 2 for video tokens
    truncated: bool = False
    images: list[ImageRef] = field(default_factory=list)  # the pictures and videos it shows, to compute pixels from
    videos: list[VideoRef] = field(default_factory=list)
    origin: tuple[str, str] = ("", "")  # (file, "line N"): for an error found when its pixels are computed
    # preference data: {"side": "chosen" | "rejected" | "completion", "label": bool (unpaired), "margin": float}
    preference: dict | None = None

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return self.media.get("pixel_values")

    @property
    def image_grid_thw(self) -> torch.Tensor | None:
        return self.media.get("image_grid_thw")

    @property
    def num_images(self) -> int:
        return len(self.image_grid_thw) if self.image_grid_thw is not None else len(self.images)

    @property
    def num_videos(self) -> int:
        grid = self.media.get("video_grid_thw")
        return len(grid) if grid is not None else len(self.videos)

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
    cuts: list[tuple[int, int, int]]  # (token index after a trained turn, pictures before it, videos before it)


class Encoder:
    """Encodes conversations for one model: its tokenizer, its processor (for images) and its family's conventions
    (tuning.families). `grounding` is a style, or a --grounding_format name ("auto": the model's own)."""

    def __init__(
        self,
        tokenizer,
        processor=None,
        *,
        family: Family = GENERIC,
        max_length: int = 2048,
        grounding: str | GroundingStyle = AUTO,
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
        require_support(family)
        self.tokenizer = tokenizer
        self.processor = processor
        self.family = family
        self.image_processor = getattr(processor, "image_processor", None)
        self.max_length = max_length
        self.overlong = overlong
        self.image_folder = image_folder
        self.image_limits = image_limits
        self.max_images = max_images
        self.train_on_last_turn_only = train_on_last_turn_only
        if isinstance(grounding, str):
            grounding = grounding_style(family, tokenizer.get_vocab(), grounding)
        self.grounding = grounding
        self.media = MediaProcessor(processor, image_folder, image_limits, max_images, family.why_no_videos)
        self.image_token = self.media.image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token) if self.image_token else None
        self.video_token = self.media.video_token
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token) if self.video_token else None
        if chat_template is None and tokenizer.chat_template is None:
            raise ValueError(
                f"the tokenizer of {tokenizer.name_or_path!r} has no chat template; use a chat model, "
                "or give one with --chat_template FILE.jinja"
            )
        self.template = ChatTemplate(tokenizer, chat_template, template_kwargs)

    # -- public -----------------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        """Everything that shapes this encoder's samples, for the cache key (tuning.data.cache): the tokenizer and
        processor as the run changed them, the chat template, every option."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = {
                "tokenizer": _tokenizer_state(self.tokenizer),
                "processor": _processor_state(self.processor),
                "template": [self.template.template or self.tokenizer.chat_template, self.template.template_kwargs],
                "family": self.family.name,
                "grounding": repr(self.grounding),
                "options": [self.max_length, self.overlong, self.image_folder, repr(self.image_limits)],
                "more": [self.max_images, self.train_on_last_turn_only],
            }
        return self._fingerprint

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
        if conv.kind != "sft":
            try:
                return self._encode_preference(conv), []
            except DroppedSample as e:
                return [], [e]
        media = self.media.plan(conv)  # pixel values are computed per batch (Encoder.pixels), never held for a set
        messages = self._template_messages(conv, media.original_sizes, self.media.resized_sizes(media))
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
                samples.append(self._sample(conv, sample_id, part, media))
            except DroppedSample as e:
                dropped.append(e)
        return samples, dropped

    def pixels(self, sample: Sample, same_as: dict | None = None) -> dict:
        """The sample's media features with pixel values, computed now from its pictures and videos; `same_as`:
        those of a sample that shows the very same ones (the other answer of a pair), taken instead."""
        if not (sample.images or sample.videos):
            return dict(sample.media)
        if same_as is not None:
            computed = same_as
        else:
            tokens = sum(1 for t in self.token_types(sample.input_ids) if t)
            try:
                computed = self.media.pixels(sample.images, sample.videos, sample.media, tokens)
            except (ImageLoadError, ValueError, RuntimeError) as e:
                raise DataError(*sample.origin, str(e)) from None
        features = {**computed, **sample.media}  # as encoded where both hold a key (the grids are checked equal)
        return self._with_cross_attention(features, sample.input_ids)

    def _with_cross_attention(self, features: dict, ids: list[int]) -> dict:
        """A cross-attention family's mask for these ids (tuning.families.cross_attention_mask), where there are
        pictures."""
        if self.family.cross_attention and "aspect_ratio_mask" in features:
            features["cross_attention_mask"] = cross_attention_mask(
                ids, self.image_token_id, features["aspect_ratio_mask"]
            )
        return features

    def placeholder_image_sample(self) -> Sample:
        """One blank picture and nothing to learn (all labels -100): added to a picture-less packed batch so
        that every rank's vision tower and projector take part in the step (DeepSpeed reduces gradients of
        the same parameters on every rank). It is its own packed sample, so it changes no loss."""
        media = self.media.blank_picture()
        start, end = self.family.vision_wrapper or ("", "")
        ids = self.tokenizer(start + media.image_texts[0] + end, add_special_tokens=False)["input_ids"]
        sample = Sample("placeholder-image", ids, [IGNORE_INDEX] * len(ids), media.first(1, 0))
        sample.mm_token_type_ids = self.token_types(ids)
        return sample

    def template_messages(self, conv: Conversation) -> list[dict]:
        """The messages as the chat template takes them (for the parity tests and for inspection)."""
        media = self.media.plan(conv)
        return self._template_messages(conv, media.original_sizes, self.media.resized_sizes(media))

    def prompt(self, conv: Conversation) -> dict:
        """The model's inputs to answer a conversation (the chat command, the web demo, evaluation, the sample
        callback), built as training builds an answer's context: the template's rendering of the messages with the
        generation prompt, pictures and videos through the same loaders, limits and processor, the user's grounding
        tags in the model's convention. Earlier assistant turns are the model's own answers and stay as written.
        Raises DataError where training would (a picture that cannot be read, a bad box)."""
        media = self.media.process(conv)
        messages = self._template_messages(
            conv, media.original_sizes, self.media.resized_sizes(media), as_written=("assistant",)
        )
        try:
            text = self.template.render(messages, True, conv.tools, add_vision_id=conv.add_vision_id)
        except TemplateError as e:
            raise conv.error(e.problem, e.fix, e.message_index) from None
        [text] = self._expand_media(conv, [Segment(text, False, 0)], media.image_texts, media.video_texts)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if media.features and self.media.token_types_input:
            inputs[self.media.token_types_input] = torch.tensor([self.token_types(ids)])
        return self._with_cross_attention({**inputs, **media.features}, ids)

    # -- preference data ----------------------------------------------------------------------------

    def _encode_preference(self, conv: Conversation) -> list[Sample]:
        """A pair as two samples, chosen then rejected (an unpaired record as one): each the prompt exactly as at
        inference and its completion's answers supervised, as SFT supervises a turn. The two share the prompt's
        ids, and neither is ever cut: a pair that does not fit is dropped or refused whole (--overlong)."""
        if conv.kind == "pair":
            chosen, rejected = conv.side(False), conv.side(True)
            media = self.media.plan(chosen)  # each picture read once where both sides show the same ones
            same = _media_parts(chosen) == _media_parts(rejected)
            samples = [
                self._side_sample(chosen, "chosen", media),
                self._side_sample(rejected, "rejected", media if same else self.media.plan(rejected)),
            ]
        else:
            shown = conv.side(False)
            samples = [self._side_sample(shown, "completion", self.media.plan(shown))]
        longest = max(len(s.input_ids) for s in samples)
        if longest > self.max_length:
            lengths = ", ".join(f"{s.preference['side']} {len(s.input_ids)}" for s in samples)
            why = f"{self._overlong_reason(max(samples, key=lambda s: len(s.input_ids)))} ({lengths} tokens)"
            if self.overlong == "error":
                raise conv.error(why, "use --overlong drop to drop such pairs, whole and reported")
            raise DroppedSample(conv.id, why)
        if len(samples) == 2:
            self._check_shared_prompt(conv, *samples)
        for sample in samples:
            sample.preference.update({"label": conv.label} if conv.label is not None else {})
            sample.preference.update({"margin": conv.margin} if conv.margin is not None else {})
        return samples

    def _side_sample(self, shown: Conversation, side: str, media) -> Sample:
        """One side of a pair (or an unpaired completion), `shown` as a conversation of its own with its media."""
        messages = self._template_messages(shown, media.original_sizes, self.media.resized_sizes(media))
        trained = [i for i in range(shown.prompt_length, len(messages)) if messages[i]["role"] == "assistant"]
        try:
            rendered = self.template.samples(messages, trained, tools=shown.tools, add_vision_id=shown.add_vision_id)
        except TemplateError as e:
            raise shown.error(e.problem, e.fix, e.message_index, side) from None
        if len(rendered) != 1:
            raise shown.error(
                f"{self.template.described} rewrites the earlier turns of this {side} completion when it renders "
                "the later ones, so the completion is no single sequence to score",
                "give completions of one assistant answer (or answers the template renders in place)",
                field=side,
            )
        images, videos = len(media.images), len(media.videos)
        tokens = self._tokenize(shown, rendered[0], media.image_texts, media.video_texts)
        sample = Sample(shown.id, tokens.ids, tokens.labels, media.first(images, videos), preference={"side": side})
        sample = _with_refs(sample, media, shown, images, videos)
        if sample.num_images or sample.num_videos:
            sample.mm_token_type_ids = self.token_types(sample.input_ids)
        return sample

    def _check_shared_prompt(self, conv: Conversation, chosen: Sample, rejected: Sample) -> None:
        """Both answers follow the same prompt ids (TRL #2054: where the two renderings differ, one side trains
        on another context); with other pictures for the rejected side (ms-swift's rejected_images) the prompts
        differ by design."""
        if chosen.images != rejected.images or chosen.videos != rejected.videos:
            return
        starts = [first_supervised(s.labels) for s in (chosen, rejected)]
        if starts[0] != starts[1] or chosen.input_ids[: starts[0]] != rejected.input_ids[: starts[1]]:
            raise conv.error(
                f"{self.template.described} renders the prompt differently before the chosen and the rejected "
                f"answer ({starts[0]} and {starts[1]} prompt tokens), so the two would be scored in different contexts",
                "check that both answers follow the same prompt messages; a template that changes the history by the "
                "answer cannot train preferences",
                field="rejected",
            )
        if chosen.input_ids == rejected.input_ids:
            raise conv.error(
                "the chosen and the rejected answers encode to the same tokens, so there is nothing to prefer",
                "give a rejected answer that differs, or drop the record",
                field="rejected",
            )

    # -- rendering --------------------------------------------------------------------------------

    def _trained_turns(self, conv: Conversation) -> list[int]:
        assistants = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
        if self.train_on_last_turn_only:
            assistants = assistants[-1:]
        return [i for i in assistants if conv.messages[i].trained]

    def _template_messages(self, conv: Conversation, original: list, resized: list, as_written=()) -> list[dict]:
        """Messages in the form the chat template takes, with grounding written in the model's convention (except
        in the messages of the roles `as_written`)."""
        messages, image_index, last_size = [], 0, None
        for i, message in enumerate(conv.messages):
            parts = []
            for part in message.parts:
                if isinstance(part, str) and message.role in as_written:
                    parts.append({"type": "text", "text": part})
                    continue
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
                    text = grounding.convert(text, self.grounding, last_size)
                except grounding.GroundingError as e:
                    raise conv.error(str(e), "fix the <ref>/<box> tags", i, "content") from None
                parts.append({"type": "text", "text": text})
            reads_strings = self._system_reads_strings if message.role == "system" else self._template_reads_strings
            messages.append(_template_message(message, _joined_texts(parts), as_parts=not reads_strings))
        return messages

    @functools.cached_property
    def _template_reads_strings(self) -> bool:
        """Whether the chat template renders a message whose content is a string (Qwen3's reads only strings;
        llava-hf's LLaVA and SmolVLM templates only lists of parts, and iterate a string's characters)."""
        return self._renders_probe(as_parts=False) or not self._renders_probe(as_parts=True)

    @functools.cached_property
    def _system_reads_strings(self) -> bool:
        """The same for a system message: Mistral Small 3.1's template reads a system prompt only from parts (it
        tests whether the message, not its content, is a string), its other messages from strings too."""
        if self._renders_probe(as_parts=False, system=True):
            return True
        return self._template_reads_strings and not self._renders_probe(as_parts=True, system=True)

    def _renders_probe(self, as_parts: bool, system: bool = False) -> bool:
        """Whether the template renders a probe exchange with its text, the content as a string or as parts
        (llava-hf's LLaVA-NeXT template reads `content[0]['text']` and fails on a string); with `system`, only the
        system message's content takes that form, the others the form the template reads."""
        texts = {"user": "Probe question", "assistant": "Probe answer"}
        if system:
            texts = {"system": "Probe rules", **texts}

        def content(role: str, text: str):
            parts = as_parts if role == "system" or not system else not self._template_reads_strings
            return [{"type": "text", "text": text}] if parts else text

        probe = [{"role": role, "content": content(role, text)} for role, text in texts.items()]
        try:
            rendered = self.template.render(probe)
        except TemplateError:
            return False
        return all(text in rendered for text in texts.values())

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

    # -- tokens -----------------------------------------------------------------------------------

    def _sample(self, conv: Conversation, sample_id: str, rendered: Rendered, media) -> Sample:
        shown = conv.messages[: rendered.num_messages]
        images, videos = sum(len(m.images) for m in shown), sum(len(m.videos) for m in shown)
        tokens = self._tokenize(conv, rendered, media.image_texts[:images], media.video_texts[:videos])
        sample = _with_refs(
            Sample(sample_id, tokens.ids, tokens.labels, media.first(images, videos)), media, conv, images, videos
        )
        if len(sample.input_ids) > self.max_length:
            sample = self._truncate(conv, sample, tokens.cuts, media)
        if sample.num_images or sample.num_videos:
            sample.mm_token_type_ids = self.token_types(sample.input_ids)
        return sample

    def token_types(self, ids: list[int]) -> list[int]:
        """mm_token_type_ids: 1 for an image token, 2 for a video token, 0 for the rest."""
        return self.media.token_types(ids)

    def _expand_media(self, conv: Conversation, segments, image_texts: list[str], video_texts: list[str]) -> list[str]:
        """Each picture or video placeholder of the template becomes what the processor says it is."""
        pattern = self.media.placeholder_pattern
        pending = {self.image_token: iter(image_texts), self.video_token: iter(video_texts)}

        def expand(match: re.Match) -> str:
            replacement = next(pending[match.group(0)], None)
            if replacement is None:
                raise self._media_mismatch(conv, len(image_texts), len(video_texts))
            return replacement

        texts = [pattern.sub(expand, s.text) if pattern else s.text for s in segments]
        if any(next(left, None) is not None for left in pending.values()):
            raise self._media_mismatch(conv, len(image_texts), len(video_texts))
        return texts

    def _media_mismatch(self, conv: Conversation, images: int, videos: int):
        return conv.error(
            f"the chat template of {self.template.name} does not write one placeholder per picture and video "
            f"({images} pictures, {videos} videos)",
            "use the model's own chat template, or one that renders every image and video part (--chat_template)",
        )

    def _tokenize(self, conv: Conversation, rendered: Rendered, image_texts, video_texts) -> _Tokens:
        """The whole text tokenized once; each token takes the label of the segment its characters are in."""
        texts = self._expand_media(conv, rendered.segments, image_texts, video_texts)
        starts = list(itertools.accumulate(map(len, texts), initial=0))
        encoded = self.tokenizer("".join(texts), add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        # each token's segment, found for all tokens at once: the one its first character is in
        bounds = np.asarray(starts, dtype=np.int64)
        last = len(rendered.segments) - 1
        segment_of_token = np.minimum(np.searchsorted(bounds, offsets[:, 0], side="right") - 1, last)
        straddles = offsets[:, 1] > bounds[segment_of_token + 1]
        # A token may span two segments that are both context (LLaVA-NeXT's ' ' after '</s>' and the next '[INST]'),
        # never a trained one's edge: its label would be half right.
        trained = np.asarray([s.supervised for s in rendered.segments] + [False])
        wrong = np.flatnonzero(straddles & (trained[segment_of_token] | trained[segment_of_token + 1]))
        if len(wrong):
            raise self._straddle(conv, rendered, texts, int(segment_of_token[wrong[0]]))
        supervised = trained[segment_of_token]
        labels = np.where(supervised, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
        pictures = list(itertools.accumulate(_count(s.text, self.image_token) for s in rendered.segments))
        videos = list(itertools.accumulate(_count(s.text, self.video_token) for s in rendered.segments))
        ends = _turn_ends(rendered.segments)
        after = np.searchsorted(segment_of_token, ends, side="right")  # token index after each turn end
        after -= (after > 0) & straddles[np.maximum(after - 1, 0)]  # a sample ending there stops before such a token
        cuts = [(cut, pictures[i], videos[i]) for cut, i in zip(after.tolist(), ends, strict=True)]
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

    def _truncate(self, conv: Conversation, sample: Sample, cuts, media) -> Sample:
        why = self._overlong_reason(sample)
        if self.overlong == "error":
            raise conv.error(why, "use --overlong turns|drop to keep what fits or drop it")
        if self.overlong == "drop":
            raise DroppedSample(sample.id, why)
        # Keep the longest run of whole turns that fits and ends after a trained turn, so no picture or video is
        # ever cut and every kept target is complete.
        fitting = [cut for cut in cuts if cut[0] <= self.max_length]
        if not fitting:
            raise DroppedSample(sample.id, f"{why}; even its first answer does not fit")
        keep, images, videos = fitting[-1]
        kept = Sample(sample.id, sample.input_ids[:keep], sample.labels[:keep], media.first(images, videos))
        kept = _with_refs(kept, media, conv, images, videos)
        kept.truncated = True
        return kept

    def _overlong_reason(self, sample: Sample) -> str:
        """The length, what the pictures and videos take of it, the limit and the two fixes."""
        types = self.token_types(sample.input_ids)
        image_tokens, video_tokens = types.count(1), types.count(2)
        parts = [f"{image_tokens} image tokens"] if image_tokens else []
        parts += [f"{video_tokens} video tokens"] if video_tokens else []
        media = f" ({', '.join(parts)})" if parts else ""
        fixes = ["raise --model_max_length"]
        if image_tokens:
            fixes.insert(0, "lower --image_max_pixels")
        if video_tokens:
            fixes.insert(0, "lower --video_max_pixels or --video_maxlen")
        return f"{len(sample.input_ids)} tokens{media}, over --model_max_length {self.max_length}: {' or '.join(fixes)}"

    def _encode_pretrain(self, conv: Conversation) -> Sample:
        end = end_of_text(self.family, self.tokenizer)
        ids = self.tokenizer(conv.pretrain_text + end, add_special_tokens=False)["input_ids"]
        truncated = len(ids) > self.max_length
        if truncated and self.overlong != "turns":
            if self.overlong == "drop":
                raise DroppedSample(conv.id, f"{len(ids)} tokens > model_max_length {self.max_length}")
            raise conv.error(f"{len(ids)} tokens, over --model_max_length {self.max_length}", "shorten the text")
        ids = ids[: self.max_length]
        return Sample(conv.id, ids, list(ids), truncated=truncated)


def _tokenizer_state(tokenizer) -> str:
    import xxhash

    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return xxhash.xxh3_128_hexdigest(f"{type(tokenizer).__name__}|{tokenizer.special_tokens_map}|{vocab}".encode())


def _processor_state(processor) -> str | None:
    if processor is None:
        return None
    parts = [type(processor).__name__, getattr(processor, "image_token", None), getattr(processor, "video_token", None)]
    for name in ("image_processor", "video_processor"):
        sub = getattr(processor, name, None)
        parts.append(sub.to_json_string() if sub is not None else None)
    return repr(parts)


def _with_refs(sample: Sample, media, conv: Conversation, images: int, videos: int) -> Sample:
    """The sample with the references of the first pictures and videos it shows, and where it was read."""
    sample.images, sample.videos = media.images[:images], media.videos[:videos]
    sample.origin = (conv.file, conv.where)
    return sample


def first_supervised(labels) -> int:
    """The index of a sample's first supervised token: where its prompt ends."""
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def _media_parts(conv: Conversation) -> list:
    return [part for message in conv.messages for part in message.media]


def _count(text: str, token: str | None) -> int:
    return text.count(token) if token else 0


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


def _joined_texts(parts: list[dict]) -> list[dict]:
    """Neighbouring text parts as one, as the data wrote them: a box converted out of a message's text is no part of
    its own (llava-hf's templates add a space after each text part, LLaVA-NeXT's renders only the first)."""
    joined: list[dict] = []
    for part in parts:
        if joined and part["type"] == "text" and joined[-1]["type"] == "text":
            joined[-1] = {"type": "text", "text": joined[-1]["text"] + part["text"]}
        else:
            joined.append(part)
    return joined


def _template_message(message, parts: list[dict], as_parts: bool = False) -> dict:
    """One message as a chat template takes it: a string where there is no picture (text-only templates such
    as Qwen3's read only strings), parts where there is or `as_parts` (a vision-language model's template: some,
    as LLaVA's, read only parts), and the tool and reasoning fields it carries."""
    has_media = any(p["type"] != "text" for p in parts)
    content = parts if has_media or as_parts else "".join(p["text"] for p in parts)
    out: dict = {"role": message.role, "content": content}
    if message.tool_calls:
        out["tool_calls"] = message.tool_calls
    if message.reasoning:
        out["reasoning_content"] = message.reasoning
    for key in ("name", "tool_call_id"):
        if getattr(message, key):
            out[key] = getattr(message, key)
    return out
