"""The one Conversation type every reader produces, and the rules every chat sample must meet."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tuning.data.errors import DataError


@dataclass(frozen=True)
class ImageRef:
    """An image named in the data: a path, an http(s) URL or a data URI, with the folder it is relative to; or
    `bytes`, the encoded image file itself, as a parquet file or a saved dataset embeds it."""

    source: str | bytes
    base_dir: str

    def __repr__(self) -> str:  # embedded bytes would fill a log or a test failure with megabytes
        source = f"<{len(self.source)} bytes>" if isinstance(self.source, bytes) else repr(self.source)
        return f"ImageRef({source}, {self.base_dir!r})"


@dataclass(frozen=True)
class VideoRef:
    """A video named in the data: a file or URL, or a list of frame images, with the folder it is relative to."""

    source: str | tuple[str, ...]
    base_dir: str


@dataclass(frozen=True)
class BoxRef:
    """A box whose coordinates need an image's size to be normalised (ms-swift's `objects`): `space` is
    'pixels' (of the original image), 'norm1' ([0,1]) or 'norm1000' ([0,1000)); `image_index` counts the
    conversation's images from 0."""

    coords: tuple[float, float, float, float]
    space: str
    image_index: int = 0


Part = str | ImageRef | VideoRef | BoxRef


@dataclass
class Message:
    role: str  # system | user | assistant | tool
    parts: list[Part]
    tool_calls: list[dict] | None = None  # {"type": "function", "function": {"name", "arguments": dict}}
    reasoning: str | None = None  # reasoning_content, passed to the template as it is
    trained: bool = True  # an assistant turn with "loss": false (or "train": false, "weight": 0) is context only
    name: str | None = None  # a tool message's function name, passed to the template
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list[ImageRef]:
        return [p for p in self.parts if isinstance(p, ImageRef)]

    @property
    def videos(self) -> list[VideoRef]:
        return [p for p in self.parts if isinstance(p, VideoRef)]

    @property
    def media(self) -> list[ImageRef | VideoRef]:
        return [p for p in self.parts if isinstance(p, (ImageRef, VideoRef))]


@dataclass
class Conversation:
    id: str
    origin: str  # "file, line N" or "file, sample <id>", for error messages
    file: str
    where: str
    format: str = ""  # the detected format, for the data report
    messages: list[Message] = field(default_factory=list)
    pretrain_text: str | None = None  # set for plain {"text"} records
    add_vision_id: bool = False  # the source labelled its pictures "Picture N:"
    tools: list[dict] | None = None  # OpenAI-style function specs, passed to the chat template
    ignored_fields: tuple[str, ...] = ()  # unknown keys skipped under --ignore_unknown_fields
    # Preference data (tuning.data.readers.preference): `messages` is the prompt (its first `prompt_length`
    # messages) and the chosen completion, or, unpaired, the completion that `label` judges; `rejected` is the
    # rejected side, its prompt (the same, or with other pictures: ms-swift's rejected_images) and completion.
    prompt_length: int | None = None
    rejected: list[Message] | None = None
    label: bool | None = None  # KTO: whether the completion is desirable
    margin: float | None = None  # reward models: how much better chosen is (Llama 2's margin loss)

    @property
    def kind(self) -> str:
        """'pair' (chosen and rejected), 'unpaired' (one completion and its label) or 'sft'."""
        if self.rejected is not None:
            return "pair"
        return "unpaired" if self.label is not None else "sft"

    def side(self, rejected: bool) -> Conversation:
        """The chosen (or the rejected) side, prompt and completion, as a conversation of its own."""
        return replace(self, messages=self.rejected if rejected else self.messages, rejected=None)

    @property
    def images(self) -> list[ImageRef]:
        return [img for m in self.messages for img in m.images]

    @property
    def videos(self) -> list[VideoRef]:
        return [video for m in self.messages for video in m.videos]

    def error(self, problem: str, fix: str = "", message_index: int | None = None, field: str | None = None):
        return DataError(self.file, self.where, problem, fix, message_index, field)


def validate(conv: Conversation) -> None:
    """Structural rules every chat sample must meet before it is encoded."""
    for i, message in enumerate(conv.messages):
        has_parts = message.text.strip() or any(not isinstance(p, str) for p in message.parts)
        if not has_parts and not message.tool_calls and not message.reasoning:
            raise conv.error(f"{message.role} message is empty", "remove the turn or give it content", i, "content")
        if message.media and message.role != "user":
            kind = "an image" if message.images else "a video"
            raise conv.error(
                f"{kind} in the {message.role} turn", "pictures and videos belong in user turns", i, "content"
            )
        if message.role == "system" and i != 0:
            raise conv.error("a system message after the first turn", "put the system prompt first", i, "role")
        if message.role == "tool" and (i == 0 or not _answers_a_call(conv.messages[i - 1])):
            raise conv.error(
                "a tool message that does not follow an assistant tool call",
                "put tool results right after the assistant message whose tool_calls they answer",
                i,
                "role",
            )
    assistants = [m for m in conv.messages if m.role == "assistant"]
    if not assistants:
        raise conv.error("no assistant turn, so nothing to train on", "add the assistant's answer")
    if not any(m.trained for m in assistants):
        raise conv.error(
            "every assistant turn is marked as not trained, so nothing to train on",
            "set 'loss' (or 'train') to true on at least one assistant message",
        )


def _answers_a_call(previous: Message) -> bool:
    return previous.role == "tool" or (previous.role == "assistant" and bool(previous.tool_calls))
