"""Chat records: turns as {"from", "value"} (Qwen-VL, LLaVA, LLaMA-Factory's sharegpt) or {"role", "content"}
(ChatML, OpenAI, LLaMA-Factory's and ms-swift's messages, XTuner's bare message lists)."""

from __future__ import annotations

from tuning.data.conversation import ImageRef, Message, Part, VideoRef
from tuning.data.readers.common import MEDIA_KEYS, METADATA_KEYS, TOOL_CALL_ROLES, TRAIN_FLAGS, Reading, role_of
from tuning.data.readers.common import trained_flag as read_trained_flag
from tuning.data.readers.media import PLACEHOLDERS, place_inline_media, split_image_tags
from tuning.data.readers.tools import parse_tool_calls, parse_tools

SHAREGPT_TURN_KEYS = {"from", "value", *TRAIN_FLAGS}
MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content", *TRAIN_FLAGS}
RECORD_KEYS = {"system", "tools", *MEDIA_KEYS, *METADATA_KEYS}


def turns_style(turns: list) -> str:
    """'sharegpt' for {"from", "value"} turns, 'messages' for {"role", "content"}."""
    first = next((t for t in turns if isinstance(t, dict)), {})
    return "sharegpt" if "from" in first or "value" in first else "messages"


def format_name(record: dict, key: str, style: str) -> str:
    if style == "messages":
        if key == "bare list":
            return "message-list"
        return "chatml" if record.get("type") == "chatml" else "messages"
    if "image" in record or "video" in record:
        return "llava"
    turns = [t for t in record[key] if isinstance(t, dict)]
    if any("<img>" in t["value"] for t in turns if isinstance(t.get("value"), str)):
        return "qwen-vl"
    roles = {t.get("from") for t in turns}
    sharegpt_keys = any(k in record for k in ("images", "videos", "tools", "system"))
    # ShareGPT names its roles human/gpt (so do LLaVA's text-only samples); Qwen-VL's data says user/assistant
    return "sharegpt" if sharegpt_keys or roles & {"human", "gpt", "observation", *TOOL_CALL_ROLES} else "qwen-vl"


def read_chat(reading: Reading, record: dict, key: str) -> list[Message]:
    """The messages of record[key] (with a top-level `system` and `tools` where the format has them)."""
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise reading.error(f"'{key}' must be a non-empty list, found {turns!r:.60}", "list the turns", field=key)
    reading.check_keys(record, {key, *RECORD_KEYS}, "record")
    reading.conv.tools = parse_tools(reading, record.get("tools"))
    messages = read_turns(reading, turns)
    return with_system(reading, messages, record.get("system"))


def with_system(reading: Reading, messages: list[Message], system) -> list[Message]:
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        raise reading.error(f"'system' must be a string, found {system!r:.60}", field="system")
    if messages and messages[0].role == "system":
        raise reading.error("a 'system' field and a system message", "keep one of them", 0, "system")
    return [Message("system", [system]), *messages]


def read_turns(reading: Reading, turns: list) -> list[Message]:
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise reading.error("a turn must be an object ('role'/'content' or 'from'/'value')", message_index=i)
        sharegpt = "from" in turn or "value" in turn
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        reading.check_keys(turn, SHAREGPT_TURN_KEYS if sharegpt else MESSAGE_KEYS, "message", i)
        role = role_of(reading, turn.get(role_key), i, role_key)
        if role in TOOL_CALL_ROLES:
            call = Message("assistant", [], parse_tool_calls(reading, turn.get(content_key), i, content_key))
            call.trained = read_trained_flag(reading, turn, "assistant", i)
            _add_call(messages, call)
            continue
        messages.append(_message(reading, turn, role, i, content_key))
    return messages


def _add_call(messages: list[Message], call: Message) -> None:
    """A tool-call turn joins the assistant message right before it (its text, or earlier calls): ms-swift
    writes an answer and its calls as consecutive messages; LLaMA-Factory's function_call stands alone."""
    previous = messages[-1] if messages else None
    if previous is not None and previous.role == "assistant":
        previous.tool_calls = [*(previous.tool_calls or []), *call.tool_calls]
        previous.trained = previous.trained and call.trained
    else:
        messages.append(call)


def _message(reading: Reading, turn: dict, role: str, index: int, content_key: str) -> Message:
    content = turn.get(content_key)
    tool_calls = None
    if turn.get("tool_calls") is not None:
        if role != "assistant":
            raise reading.error(f"tool_calls in a {role} message", "only assistant messages call tools", index)
        tool_calls = parse_tool_calls(reading, turn["tool_calls"], index, "tool_calls")
    if content is None and tool_calls:
        parts: list[Part] = []
    elif isinstance(content, str):
        parts = split_image_tags(reading, content, index)
    elif isinstance(content, list) and content_key == "content":
        parts = [_content_part(reading, part, index) for part in content]
        parts = place_inline_media(reading, [q for p in parts for q in p], index)
    else:
        kind = "a string or a list of parts" if content_key == "content" else "a string"
        raise reading.error(
            f"'{content_key}' must be {kind}, found {content!r:.60}", message_index=index, field=content_key
        )
    reasoning = turn.get("reasoning_content")
    if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
        raise reading.error(
            "'reasoning_content' must be a string on an assistant message",
            message_index=index,
            field="reasoning_content",
        )
    for key in ("name", "tool_call_id"):
        if turn.get(key) is not None and not isinstance(turn[key], str):
            raise reading.error(f"'{key}' must be a string", message_index=index, field=key)
    return Message(
        role,
        parts,
        tool_calls=tool_calls,
        reasoning=reasoning or None,
        trained=read_trained_flag(reading, turn, role, index),
        name=turn.get("name"),
        tool_call_id=turn.get("tool_call_id"),
    )


def _content_part(reading: Reading, part, index: int) -> list[Part]:
    """One OpenAI / Hugging Face content part: text, image (image, url, path, image_url) or video."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return split_image_tags(reading, part["text"], index)
    if kind in ("image", "image_url"):
        source = part.get("image") or part.get("url") or part.get("path") or part.get("image_url")
        source = source.get("url") if isinstance(source, dict) else source
        if isinstance(source, str) and source:
            return [ImageRef(source, reading.base_dir)]
        if kind == "image" and set(part) == {"type"}:
            # Hugging Face's VLM datasets (and TRL's): the picture is the next of the record's `images`, in order
            return [PLACEHOLDERS["image"]]
    if kind in ("video", "video_url"):
        source = part.get("video") or part.get("url") or part.get("path") or part.get("video_url")
        source = source.get("url") if isinstance(source, dict) else source
        if kind == "video" and set(part) == {"type"}:
            return [PLACEHOLDERS["video"]]
        if isinstance(source, str) and source:
            return [VideoRef(source, reading.base_dir)]
        if isinstance(source, list) and source and all(isinstance(s, str) for s in source):
            return [VideoRef(tuple(source), reading.base_dir)]
    if kind in ("audio", "input_audio", "audio_url"):
        raise reading.error("an audio part: no audio model is supported", "remove the audio", index, "content")
    raise reading.error(
        f"content part {part!r:.80} is not understood",
        'use {"type": "text", "text": ...}, {"type": "image", "image": PATH}, {"type": "image_url", '
        '"image_url": {"url": ...}} or {"type": "video", "video": PATH}',
        index,
        "content",
    )
