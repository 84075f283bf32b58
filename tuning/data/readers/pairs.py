"""Records written as prompt/answer pairs: alpaca (LLaMA-Factory's default, XTuner's alpaca configs),
ms-swift's query/response and its {"conversation": [{"human", "assistant"}]}."""

from __future__ import annotations

from tuning.data.conversation import Message
from tuning.data.readers.chat import with_system
from tuning.data.readers.common import MEDIA_KEYS, METADATA_KEYS, Reading
from tuning.data.readers.media import split_image_tags
from tuning.data.readers.tools import parse_tools

ALPACA_KEYS = {"instruction", "input", "output", "system", "history", *MEDIA_KEYS, *METADATA_KEYS}
QUERY_KEYS = {"query", "response", "history", "system", "tools", *MEDIA_KEYS, *METADATA_KEYS}
SWIFT_SHAREGPT_KEYS = {"conversation", "system", "tools", *MEDIA_KEYS, *METADATA_KEYS}


def read_alpaca(reading: Reading, record: dict) -> list[Message]:
    """The prompt is the instruction, a newline and the input (when there is one), as LLaMA-Factory and XTuner
    join them; `history` holds the earlier [prompt, answer] pairs."""
    reading.check_keys(record, ALPACA_KEYS, "record")
    instruction = _text(reading, record, "instruction")
    extra = _text(reading, record, "input", required=False)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    pairs = [*_history(reading, record), (prompt, _text(reading, record, "output"))]
    return with_system(reading, _messages(reading, pairs), record.get("system"))


def read_query_response(reading: Reading, record: dict) -> list[Message]:
    reading.check_keys(record, QUERY_KEYS, "record")
    reading.conv.tools = parse_tools(reading, record.get("tools"))
    pairs = [*_history(reading, record), (_text(reading, record, "query"), _text(reading, record, "response"))]
    return with_system(reading, _messages(reading, pairs), record.get("system"))


def read_swift_sharegpt(reading: Reading, record: dict) -> list[Message]:
    reading.check_keys(record, SWIFT_SHAREGPT_KEYS, "record")
    reading.conv.tools = parse_tools(reading, record.get("tools"))
    rounds = record["conversation"]
    if not isinstance(rounds, list) or not rounds:
        raise reading.error("'conversation' must be a non-empty list of {human, assistant}", field="conversation")
    pairs = []
    for i, round_ in enumerate(rounds):
        if not isinstance(round_, dict) or set(round_) != {"human", "assistant"}:
            raise reading.error(
                f"conversation[{i}] must be an object with 'human' and 'assistant'", field="conversation"
            )
        pairs.append((round_["human"], round_["assistant"]))
    return with_system(reading, _messages(reading, pairs), record.get("system"))


def _text(reading: Reading, record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        kind = "a list: ranking data is preference data" if isinstance(value, list) else f"{value!r:.60}"
        raise reading.error(f"'{key}' must be a string, found {kind}", f"give '{key}' as text", field=key)
    return value


def _history(reading: Reading, record: dict) -> list[tuple[str, str]]:
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair) for pair in history
    ):
        raise reading.error(
            "'history' must be a list of [prompt, answer] pairs of strings",
            "write [[q1, a1], [q2, a2], ...]",
            field="history",
        )
    return [tuple(pair) for pair in history]


def _messages(reading: Reading, pairs: list[tuple[str, str]]) -> list[Message]:
    messages = []
    for prompt, answer in pairs:
        index = len(messages)
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise reading.error("prompts and answers must be strings", message_index=index)
        messages.append(Message("user", split_image_tags(reading, prompt, index)))
        messages.append(Message("assistant", split_image_tags(reading, answer, index + 1)))
    return messages
