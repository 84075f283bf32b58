"""Read every accepted data format into one Conversation type.

Formats are detected per record, so files may mix them:
- Qwen-VL:  {"id", "conversations": [{"from": "user"|"human"|"assistant"|"gpt"|"system", "value"}]}
- ChatML:   {"type": "chatml", "messages": [{"role", "content": str}], "source"}
- OpenAI:   {"messages": [{"role", "content": [{"type": "text", "text"} | {"type": "image", "image"}
                                                | {"type": "image_url", "image_url": {"url"}}]}]}
- plain:    {"text"} for incremental pre-training (loss on every token)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tuning.data.errors import DataError

ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
# Qwen-VL writes "Picture N: " before each image; the model's template writes its own numbering.
IMAGE_TAG = re.compile(r"(?:Picture\s+\d+\s*:\s*)?<img>(.*?)</img>", re.DOTALL)
PICTURE_LABEL = re.compile(r"Picture\s+\d+\s*:\s*<img>")


@dataclass(frozen=True)
class ImageRef:
    """An image named in the data: a path, an http(s) URL or a data URI, with the folder it is relative to."""

    source: str
    base_dir: str


@dataclass
class Message:
    role: str  # system | user | assistant
    parts: list[str | ImageRef]

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list[ImageRef]:
        return [p for p in self.parts if isinstance(p, ImageRef)]


@dataclass
class Conversation:
    id: str
    origin: str  # "file, line N" or "file, sample <id>", for error messages
    file: str
    where: str
    messages: list[Message] = field(default_factory=list)
    pretrain_text: str | None = None  # set for plain {"text"} records
    add_vision_id: bool = False  # the source labelled its pictures "Picture N:"

    @property
    def images(self) -> list[ImageRef]:
        return [img for m in self.messages for img in m.images]

    def error(self, problem: str, fix: str = "", message_index: int | None = None, field: str | None = None):
        return DataError(self.file, self.where, problem, fix, message_index, field)


def read_records(path: str | Path) -> Iterator[tuple[str, dict | DataError]]:
    """Yield (where, record) for a JSON list or a JSONL file; a line that does not parse yields a DataError."""
    path = Path(path)
    if path.suffix == ".parquet" or (path.is_dir() and (path / "dataset_info.json").is_file()):
        yield from _dataset_records(path)
        return
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}. Check --data_path.")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(str(path), "whole file", "the file is empty", "point --data_path at a file with samples")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(str(path), f"line {e.lineno}", f"malformed JSON ({e.msg})", "fix the JSON syntax") from None
        for i, record in enumerate(records):
            sample_id = record.get("id", i) if isinstance(record, dict) else i
            yield f"sample {sample_id} (index {i})", record
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {lineno}", DataError(str(path), f"line {lineno}", f"malformed JSON ({e.msg})", "fix the line")


def records_from_dataset(dataset) -> Iterator[tuple[str, dict]]:
    """Records of a `datasets.Dataset` (for example loaded from local JSON/JSONL/parquet files)."""
    for i, record in enumerate(dataset):
        yield f"row {i}", dict(record)


def _dataset_records(path: Path) -> Iterator[tuple[str, dict]]:
    import datasets

    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
    yield from records_from_dataset(dataset)


def parse_record(record: dict | DataError, file: str, where: str, index: int) -> Conversation:
    """Turn one record into a Conversation, or raise a DataError that says what is wrong."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(file, where, f"expected a JSON object, found {type(record).__name__}", "one sample per object")
    sample_id = str(record.get("id", f"{Path(file).stem}-{index}"))
    conv = Conversation(id=sample_id, origin=f"{file}, {where}", file=file, where=where)
    base_dir = str(Path(file).resolve().parent)
    if "conversations" in record:
        turns = record["conversations"]
        _expect_list(conv, turns, "conversations")
        for i, turn in enumerate(turns):
            conv.messages.append(_qwen_vl_turn(conv, turn, i, base_dir))
    elif "messages" in record:
        turns = record["messages"]
        _expect_list(conv, turns, "messages")
        for i, turn in enumerate(turns):
            conv.messages.append(_message_turn(conv, turn, i, base_dir))
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise conv.error("'text' is empty or not a string", "give the pre-training text as a string", field="text")
        conv.pretrain_text = record["text"]
        return conv
    else:
        raise conv.error(
            f"unknown sample format (keys: {', '.join(sorted(record)) or 'none'})",
            "use 'conversations' (Qwen-VL), 'messages' (ChatML/OpenAI) or 'text' (pre-training)",
        )
    validate(conv)
    return conv


def _expect_list(conv: Conversation, turns, name: str) -> None:
    if not isinstance(turns, list) or not turns:
        raise conv.error(f"'{name}' must be a non-empty list, found {turns!r:.60}", "list the turns", field=name)


def _role(conv: Conversation, raw, index: int, key: str) -> str:
    if raw not in ROLE_ALIASES:
        allowed = ", ".join(sorted(ROLE_ALIASES))
        raise conv.error(f"unknown role {raw!r}", f"use one of {allowed}", message_index=index, field=key)
    return ROLE_ALIASES[raw]


def _qwen_vl_turn(conv: Conversation, turn, index: int, base_dir: str) -> Message:
    if not isinstance(turn, dict):
        raise conv.error("a turn must be an object with 'from' and 'value'", message_index=index)
    role = _role(conv, turn.get("from"), index, "from")
    value = turn.get("value")
    if not isinstance(value, str):
        raise conv.error(f"'value' must be a string, found {value!r:.60}", message_index=index, field="value")
    return Message(role, split_images(conv, value, index, base_dir))


def _message_turn(conv: Conversation, turn, index: int, base_dir: str) -> Message:
    if not isinstance(turn, dict):
        raise conv.error("a message must be an object with 'role' and 'content'", message_index=index)
    role = _role(conv, turn.get("role"), index, "role")
    content = turn.get("content")
    if isinstance(content, str):
        return Message(role, split_images(conv, content, index, base_dir))
    if not isinstance(content, list):
        raise conv.error(
            f"'content' must be a string or a list of parts, found {content!r:.60}",
            message_index=index,
            field="content",
        )
    return Message(role, [_content_part(conv, part, index, base_dir) for part in content])


def _content_part(conv: Conversation, part, index: int, base_dir: str) -> str | ImageRef:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "image" and isinstance(part.get("image"), str):
        return ImageRef(part["image"], base_dir)
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if isinstance(url, str):
            return ImageRef(url, base_dir)
    raise conv.error(
        f"content part {part!r:.80} is not understood",
        'use {"type": "text", "text": ...}, {"type": "image", "image": PATH} '
        'or {"type": "image_url", "image_url": {"url": ...}}',
        message_index=index,
        field="content",
    )


def split_images(conv: Conversation, text: str, index: int, base_dir: str) -> list[str | ImageRef]:
    """Split "Picture N: <img>PATH</img>" spans out of a text into image parts, in place."""
    if PICTURE_LABEL.search(text):
        conv.add_vision_id = True
    parts: list[str | ImageRef] = []
    position = 0
    for match in IMAGE_TAG.finditer(text):
        parts.append(text[position : match.start()])
        source = match.group(1).strip()
        if not source or "<img>" in source:
            raise conv.error(
                f"<img> tag at character {match.start()} has no image path", "write <img>PATH</img>", index, "value"
            )
        parts.append(ImageRef(source, base_dir))
        position = match.end()
    parts.append(text[position:])
    leftover = "".join(p for p in parts if isinstance(p, str))
    if "<img>" in leftover or "</img>" in leftover:
        raise conv.error(
            "an <img> tag is not closed (or a </img> has no <img>)", "write <img>PATH</img>", index, "value"
        )
    return [p for p in parts if p != ""]


def validate(conv: Conversation) -> None:
    """Structural rules every chat sample must meet before it is encoded."""
    for i, message in enumerate(conv.messages):
        if not message.text.strip() and not message.images:
            raise conv.error(f"{message.role} message is empty", "remove the turn or give it content", i, "content")
        if message.images and message.role != "user":
            raise conv.error(f"an image in the {message.role} turn", "images belong in user turns", i, "content")
        if message.role == "system" and i != 0:
            raise conv.error("a system message after the first turn", "put the system prompt first", i, "role")
    if not any(m.role == "assistant" for m in conv.messages):
        raise conv.error("no assistant turn, so nothing to train on", "add the assistant's answer")


def iter_conversations(paths: Iterable[str | Path]) -> Iterator[Conversation | DataError]:
    """Every sample of every file, as a Conversation or as the DataError that describes it."""
    for path in paths:
        file = str(path)
        for index, (where, record) in enumerate(read_records(path)):
            try:
                yield parse_record(record, file, where, index)
            except DataError as e:
                yield e
