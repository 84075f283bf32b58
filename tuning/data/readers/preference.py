"""Preference records (a prompt, a chosen and a rejected completion) and unpaired ones (a completion and whether it
is desirable), in every shape the peers document:

- trl-standard:        {"prompt": str, "chosen": str, "rejected": str}; the prompt is a user turn
- trl-conversational:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, `images` for the
                       {"type": "image"} parts (TRL's vision DPO data)
- trl-implicit:        {"chosen": [conversation], "rejected": [conversation]}: the prompt is their common prefix
- trl-unpaired:        {"prompt", "completion", "label": bool} (KTO), standard or conversational
- alpaca-preference:   {"instruction", "input", "chosen": str, "rejected": str, "system", "history"} (LLaMA-Factory)
- sharegpt-preference: {"conversations" ending on a user turn, "chosen": {"from", "value"}, "rejected": {...},
                       "images", "system", "tools"} (LLaMA-Factory)
- kto-tag:             {"messages" or "conversations", "kto_tag": bool} (LLaMA-Factory's KTO data)
- swift-preference:    {"messages", "rejected_response": str or [messages], "rejected_messages", "rejected_images"}
- rlaif-v:             {"question", "chosen", "rejected", "image"} (openbmb/RLAIF-V-Dataset as it is on the hub)
- chat-unpaired:       {"messages" or "conversations", "label": bool} (ms-swift's and LLaMA-Factory's KTO data)

Every record becomes one Conversation: `messages` holds the prompt and the chosen completion (unpaired: the
completion), `rejected` the rejected side. A prompt's own assistant turns are context; every assistant turn of a
completion is trained. Optional `margin` (a number) on paired records, for reward models.
"""

from __future__ import annotations

import math

from tuning.data.conversation import Message, validate
from tuning.data.errors import DataError
from tuning.data.readers.chat import RECORD_KEYS, read_turns, with_system
from tuning.data.readers.common import MEDIA_KEYS, METADATA_KEYS, Reading
from tuning.data.readers.media import place_listed_media, refuse_audio_placeholders, split_image_tags
from tuning.data.readers.pairs import _history, _messages, _text
from tuning.data.readers.tools import parse_tools

PAIRED = ("dpo", "rm")
STAGES = ("sft", "pt", "dpo", "kto", "rm")
PREFERENCE_SIDE_KEYS = {"margin", "rejected_images", "rejected_videos"}


def preference_format(record: dict) -> str | None:
    """The preference shape of a record, or None for a supervised one."""
    chat = "messages" in record or "conversations" in record
    if any(k in record for k in ("rejected_response", "rejected_messages", "rejected_images")):
        return "swift-preference"
    if "question" in record and "chosen" in record:
        return "rlaif-v"
    if "chosen" in record or "rejected" in record:
        if "instruction" in record:
            return "alpaca-preference"
        if chat:
            return "sharegpt-preference"
        if "prompt" in record:
            return "trl-standard" if isinstance(record["prompt"], str) else "trl-conversational"
        return "trl-implicit"
    if "kto_tag" in record and chat:
        return "kto-tag"
    if "label" in record and chat:
        return "chat-unpaired"
    if "completion" in record and "label" in record:
        return "trl-unpaired"
    return None


def read_preference(reading: Reading, record: dict, name: str, stage: str) -> None:
    """Read a preference or unpaired record into reading.conv, refusing one its stage cannot train."""
    conv = reading.conv
    conv.format = name
    if name in ("kto-tag", "chat-unpaired", "trl-unpaired"):
        if stage in PAIRED:
            raise reading.error(
                f"an unpaired record (one completion and a label) cannot train --stage {stage}, which compares a "
                "chosen with a rejected answer",
                "use --stage kto for unpaired data, or give each prompt a chosen and a rejected answer",
                field="label" if "label" in record else "kto_tag",
            )
        prompt, completion = _UNPAIRED[name](reading, record)
        conv.label = _label(reading, record, "kto_tag" if name == "kto-tag" else "label")
        conv.messages = _sides(reading, prompt, completion, record)
        _finish(reading)
        return
    prompt, chosen, rejected = _PAIRED[name](reading, record)
    conv.messages = _sides(reading, prompt, chosen, record)
    conv.rejected = _sides(reading, prompt, rejected, _rejected_media(record))
    conv.margin = _margin(reading, record)
    _finish(reading)


def _finish(reading: Reading) -> None:
    conv = reading.conv
    sides = [("chosen" if conv.rejected is not None else "completion", conv.side(False))]
    if conv.rejected is not None:
        sides.append(("rejected", conv.side(True)))
    for field, side in sides:
        refuse_audio_placeholders(reading, side.messages)
        completion = side.messages[conv.prompt_length :]
        if not completion or not any(m.role == "assistant" for m in completion):
            raise reading.error(f"the {field} completion has no assistant answer", "give the answer", field=field)
        if not any(m.text.strip() or m.tool_calls for m in completion if m.role == "assistant"):
            raise reading.error(
                f"the {field} answer is empty", f"give the {field} answer, or drop the record", field=field
            )
        validate(side)
    if conv.rejected is not None and _same(conv.messages, conv.rejected):
        raise reading.error(
            "the chosen and the rejected answers are the same, so there is nothing to prefer",
            "give a rejected answer that differs, or drop the record",
            field="rejected",
        )


def _sides(reading: Reading, prompt: list[Message], completion: list[Message], media_record: dict) -> list[Message]:
    """Prompt and completion as one list of messages: the prompt's assistant turns are context, the completion's
    trained; the record's pictures and videos placed in order."""
    prompt = [_copy(m, trained=False) for m in prompt]
    completion = [_copy(m, trained=True) for m in completion]
    reading.conv.prompt_length = len(prompt)
    messages = [*prompt, *completion]
    place_listed_media(reading, messages, media_record)
    return messages


def _copy(message: Message, trained: bool) -> Message:
    return Message(
        message.role,
        list(message.parts),
        tool_calls=message.tool_calls,
        reasoning=message.reasoning,
        trained=trained and message.role == "assistant",
        name=message.name,
        tool_call_id=message.tool_call_id,
    )


def _same(a: list[Message], b: list[Message]) -> bool:
    def content(messages: list[Message]) -> list[tuple]:
        return [(m.role, m.parts, m.tool_calls, m.reasoning) for m in messages]

    return content(a) == content(b)


def _rejected_media(record: dict) -> dict:
    """The media the rejected side shows: its own (ms-swift's rejected_images) or the prompt's."""
    media = {k: v for k, v in record.items() if k in MEDIA_KEYS}
    for kind in ("images", "videos"):
        if f"rejected_{kind}" in record:
            media[kind] = record[f"rejected_{kind}"]
    return media


# -- the shapes ---------------------------------------------------------------------------------------------------

TRL_KEYS = {
    "prompt",
    "chosen",
    "rejected",
    "images",
    "videos",
    "tools",
    "system",
    *PREFERENCE_SIDE_KEYS,
    *METADATA_KEYS,
}


def _trl(reading: Reading, record: dict):
    reading.check_keys(record, TRL_KEYS, "record")
    reading.conv.tools = parse_tools(reading, record.get("tools"))
    prompt = _with_system(reading, _prompt(reading, record["prompt"], "prompt"), record)
    return prompt, _completion(reading, record, "chosen"), _completion(reading, record, "rejected")


def _trl_implicit(reading: Reading, record: dict):
    """Chosen and rejected as whole conversations: the prompt is the messages they share from the start."""
    reading.check_keys(record, TRL_KEYS - {"prompt"}, "record")
    reading.conv.tools = parse_tools(reading, record.get("tools"))
    chosen, rejected = (record.get(key) for key in ("chosen", "rejected"))
    if isinstance(chosen, str) and isinstance(rejected, str):
        raise reading.error(
            "'chosen' and 'rejected' are texts without a 'prompt': where the prompt ends in them is not known",
            "add the shared beginning as 'prompt', or write both as conversations (lists of messages)",
            field="prompt",
        )
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list) or not value:
            raise _missing(reading, key, value)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and _role(chosen[shared - 1]) not in ("user", "human", "tool"):
        shared -= 1  # the completion starts with the answer: a shared start of the answers stays in both
    if shared == 0:
        raise reading.error(
            "'chosen' and 'rejected' share no prompt (no common messages ending on a user turn)",
            "start both conversations with the same prompt messages, or give 'prompt' separately",
            field="chosen",
        )
    prompt = _with_system(reading, read_turns(reading, chosen[:shared]), record)
    completions = [_turns(reading, value[shared:], key) for key, value in (("chosen", chosen), ("rejected", rejected))]
    return prompt, *completions


def _alpaca(reading: Reading, record: dict):
    keys = {"instruction", "input", "chosen", "rejected", "system", "history", *MEDIA_KEYS, *METADATA_KEYS}
    reading.check_keys(record, keys | PREFERENCE_SIDE_KEYS, "record")
    instruction = _text(reading, record, "instruction")
    extra = _text(reading, record, "input", required=False)
    history = _messages(reading, _history(reading, record))
    question = Message("user", split_image_tags(reading, f"{instruction}\n{extra}" if extra else instruction, 0))
    prompt = with_system(reading, [*history, question], record.get("system"))
    return prompt, _completion(reading, record, "chosen"), _completion(reading, record, "rejected")


def _sharegpt(reading: Reading, record: dict):
    key = "conversations" if "conversations" in record else "messages"
    reading.check_keys(record, {key, "chosen", "rejected", *RECORD_KEYS, *PREFERENCE_SIDE_KEYS}, "record")
    reading.conv.tools = parse_tools(reading, record.get("tools"))
    prompt = with_system(reading, _prompt(reading, record[key], key), record.get("system"))
    return prompt, _completion(reading, record, "chosen"), _completion(reading, record, "rejected")


def _swift(reading: Reading, record: dict):
    """ms-swift: `messages` ends with the chosen answer; `rejected_response` (a text, or messages: a tool trajectory)
    replaces everything after the last user turn, or `rejected_messages` is the whole rejected conversation; with
    `rejected_images` alone, the same conversation over other pictures is the rejected side."""
    keys = {"messages", "rejected_response", "rejected_messages", *RECORD_KEYS, *PREFERENCE_SIDE_KEYS}
    reading.check_keys(record, keys, "record")
    reading.conv.tools = parse_tools(reading, record.get("tools"))
    if "rejected_messages" in record:
        return _trl_implicit_from(reading, record["messages"], record["rejected_messages"], record)
    messages = _turns(reading, record.get("messages"), "messages")
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    start = users[-1] + 1 if users else 0
    if start >= len(messages) or messages[-1].role != "assistant":
        raise reading.error(
            "'messages' must end with the chosen assistant answer that the rejected side is the alternative to",
            "end 'messages' with the chosen answer",
            field="messages",
        )
    rejected = record.get("rejected_response")
    if rejected is None and "rejected_images" in record:
        completion = messages[start:]  # the same answer, judged worse over the rejected pictures
    elif isinstance(rejected, list):
        completion = _turns(reading, rejected, "rejected_response")
    else:
        completion = [_answer(reading, rejected, "rejected_response")]
    prompt = with_system(reading, messages[:start], record.get("system"))
    return prompt, messages[start:], completion


def _rlaif_v(reading: Reading, record: dict):
    """RLAIF-V's own columns: the question about the picture in `image`; other columns are its bookkeeping."""
    bookkeeping = {"ds_name", "origin_dataset", "origin_split", "idx", "image_path"}
    reading.check_keys(record, {"question", "chosen", "rejected", "image", *bookkeeping, *METADATA_KEYS}, "record")
    question = _prompt(reading, record.get("question"), "question")
    return question, _completion(reading, record, "chosen"), _completion(reading, record, "rejected")


def _trl_implicit_from(reading: Reading, chosen, rejected, record: dict):
    shared = {k: v for k, v in record.items() if k in TRL_KEYS}
    return _trl_implicit(reading, {**shared, "chosen": chosen, "rejected": rejected})


def _unpaired_chat(reading: Reading, record: dict):
    """LLaMA-Factory's and ms-swift's KTO data: the conversation's last assistant answer is judged."""
    key = "conversations" if "conversations" in record else "messages"
    reading.check_keys(record, {key, "kto_tag", "label", *RECORD_KEYS}, "record")
    reading.conv.tools = parse_tools(reading, record.get("tools"))
    messages = with_system(reading, _turns(reading, record[key], key), record.get("system"))
    if messages[-1].role != "assistant":
        raise reading.error(f"'{key}' must end with the assistant answer that the label judges", field=key)
    return messages[:-1], messages[-1:]


def _trl_unpaired(reading: Reading, record: dict):
    reading.check_keys(record, {"prompt", "completion", "label", "images", "tools", "system", *METADATA_KEYS}, "record")
    reading.conv.tools = parse_tools(reading, record.get("tools"))
    prompt = _with_system(reading, _prompt(reading, record.get("prompt"), "prompt"), record)
    return prompt, _completion(reading, record, "completion")


_PAIRED = {
    "trl-standard": _trl,
    "trl-conversational": _trl,
    "trl-implicit": _trl_implicit,
    "alpaca-preference": _alpaca,
    "sharegpt-preference": _sharegpt,
    "swift-preference": _swift,
    "rlaif-v": _rlaif_v,
}
_UNPAIRED = {"kto-tag": _unpaired_chat, "chat-unpaired": _unpaired_chat, "trl-unpaired": _trl_unpaired}


# -- pieces -------------------------------------------------------------------------------------------------------


def _prompt(reading: Reading, value, key: str) -> list[Message]:
    """A prompt: a text (one user turn) or messages ending on a user (or tool) turn."""
    if isinstance(value, str):
        if not value.strip():
            raise reading.error(f"'{key}' is empty", "give the prompt", field=key)
        return [Message("user", split_image_tags(reading, value, 0))]
    messages = _turns(reading, value, key)
    if messages[-1].role not in ("user", "tool"):
        raise reading.error(
            f"'{key}' ends with a {messages[-1].role} turn: the answers must follow a user turn",
            f"end '{key}' with the user's question, and give the answers as 'chosen' and 'rejected'",
            len(messages) - 1,
            key,
        )
    return messages


def _completion(reading: Reading, record: dict, key: str) -> list[Message]:
    """An answer: a text, a message object ({"role", "content"} or {"from", "value"}) or a list of messages."""
    value = record.get(key)
    if isinstance(value, dict):
        return _turns(reading, [value], key)
    if isinstance(value, list):
        return _turns(reading, value, key)
    return [_answer(reading, value, key)]


def _answer(reading: Reading, value, key: str) -> Message:
    if not isinstance(value, str):
        raise _missing(reading, key, value)
    if not value.strip():
        raise reading.error(f"the {key} answer is empty", f"give the {key} answer, or drop the record", field=key)
    return Message("assistant", split_image_tags(reading, value, 0))


def _turns(reading: Reading, value, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _missing(reading, key, value)
    try:
        return read_turns(reading, value)
    except DataError as e:  # name the field the turns are in
        e.field = e.field or key
        raise


def _missing(reading: Reading, key: str, value):
    found = "missing" if value is None else f"{value!r:.60}"
    return reading.error(
        f"'{key}' must be an answer (a text, a message or a list of messages), found {found}",
        f"give '{key}' for every record of preference data",
        field=key,
    )


def _with_system(reading: Reading, messages: list[Message], record: dict) -> list[Message]:
    return with_system(reading, messages, record.get("system"))


def _role(turn) -> str | None:
    return turn.get("role", turn.get("from")) if isinstance(turn, dict) else None


def _label(reading: Reading, record: dict, key: str) -> bool:
    value = record.get(key)
    if not isinstance(value, bool):
        raise reading.error(
            f"'{key}' is {value!r}: it says whether the answer is desirable, so it must be true or false",
            f"write '{key}': true for a good answer, false for a bad one",
            field=key,
        )
    return value


def _margin(reading: Reading, record: dict) -> float | None:
    value = record.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise reading.error(f"'margin' is {value!r}", "give the margin as a finite number", field="margin")
    return float(value)
