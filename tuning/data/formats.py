"""Detect the format of every record and read it into the one Conversation type.

Formats are detected per record, so files may mix them (tuning/data/readers/ holds one reader per family):
- qwen-vl:        {"id", "conversations": [{"from": "user"/"assistant", "value"}]}, pictures as <img>PATH</img>
- llava:          {"image" or "video", "conversations": [{"from": "human"/"gpt", "value"}]} with <image>/<video>
                  (LLaVA, Qwen2.5-VL's qwen-vl-finetune demo, the Qwen2-VL fine-tuning repos)
- sharegpt:       {"conversations": [{"from", "value"}], "images", "videos", "system", "tools"} (LLaMA-Factory)
- messages:       {"messages": [{"role", "content"}], "images", "videos", "tools", "objects"} (OpenAI,
                  LLaMA-Factory, ms-swift; content a string or parts; XTuner's <IMG_CONTEXT>)
- chatml:         {"type": "chatml", "messages": [...], "source"} (Qwen's ChatML JSONL)
- message-list:   each JSONL line a bare list of messages (XTuner's openai_sft.jsonl)
- alpaca:         {"instruction", "input", "output", "system", "history"} (alpaca, LLaMA-Factory, XTuner)
- query-response: {"query", "response", "history", "system"} (ms-swift)
- swift-sharegpt: {"system", "conversation": [{"human", "assistant"}]} (ms-swift)
- text:           {"text"} for pre-training, loss on every token
- preference:     prompt/chosen/rejected pairs and unpaired (KTO) records of TRL, LLaMA-Factory and ms-swift
                  (tuning/data/readers/preference.py), read for --stage dpo, kto and rm only
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tuning.data.conversation import BoxRef, Conversation, ImageRef, Message, VideoRef, validate
from tuning.data.errors import DataError
from tuning.data.files import read_records, records_from_dataset
from tuning.data.readers.chat import format_name, read_chat, read_turns, turns_style
from tuning.data.readers.common import METADATA_KEYS, Reading, refuse_unsupported
from tuning.data.readers.media import place_listed_media, place_objects, refuse_audio_placeholders
from tuning.data.readers.pairs import read_alpaca, read_query_response, read_swift_sharegpt
from tuning.data.readers.preference import preference_format, read_preference

__all__ = [
    "BoxRef",
    "Conversation",
    "ImageRef",
    "Message",
    "VideoRef",
    "iter_conversations",
    "parse_record",
    "read_records",
    "records_from_dataset",
]

KNOWN_FORMATS = (
    "'conversations' (Qwen-VL, LLaVA, ShareGPT), 'messages' (OpenAI, ChatML, ms-swift), 'instruction'/'output' "
    "(alpaca), 'query'/'response' (ms-swift) or 'text' (pre-training)"
)


def parse_record(
    record, file: str, where: str, index: int, ignore_unknown_fields: bool = False, stage: str = "sft"
) -> Conversation:
    """Turn one record into a Conversation, or raise a DataError that says what is wrong. `stage` (sft, pt, dpo, kto,
    rm) says which records may train: preference records only a preference stage, and the other way round."""
    if isinstance(record, DataError):
        raise record
    sample_id = record.get("id", f"{Path(file).stem}-{index}") if isinstance(record, dict) else None
    conv = Conversation(
        id=str(sample_id if sample_id is not None else f"{Path(file).stem}-{index}"),
        origin=f"{file}, {where}",
        file=file,
        where=where,
    )
    reading = Reading(conv, str(Path(file).resolve().parent), ignore_unknown_fields)
    if isinstance(record, list):  # XTuner's openai_sft.jsonl: each line a bare list of messages
        refuse_unsupported(reading, {}, None, stage)
        conv.format = "message-list"
        return _finish(reading, read_turns(reading, record), {})
    if not isinstance(record, dict):
        raise conv.error(f"expected a JSON object, found {type(record).__name__}", "one sample per object")
    preference = preference_format(record)
    refuse_unsupported(reading, record, preference, stage)
    if preference is not None:
        read_preference(reading, record, preference, stage)
        return conv
    for key in ("conversations", "messages"):
        if key in record:
            turns = record[key]
            style = turns_style(turns) if isinstance(turns, list) else "messages"
            conv.format = format_name(record, key, style)
            return _finish(reading, read_chat(reading, record, key), record)
    readers = {
        "instruction": ("alpaca", read_alpaca),
        "query": ("query-response", read_query_response),
        "conversation": ("swift-sharegpt", read_swift_sharegpt),
    }
    for key, (name, read) in readers.items():
        if key in record:
            conv.format = name
            return _finish(reading, read(reading, record), record)
    if "text" in record:
        return _pretraining(reading, record)
    raise conv.error(
        f"unknown sample format (keys: {', '.join(sorted(map(str, record))) or 'none'})", f"use {KNOWN_FORMATS}"
    )


def _finish(reading: Reading, messages: list[Message], record: dict) -> Conversation:
    place_listed_media(reading, messages, record)
    if record.get("objects") is not None:
        place_objects(reading, messages, record["objects"])
    refuse_audio_placeholders(reading, messages)
    reading.conv.messages = messages
    validate(reading.conv)
    return reading.conv


def _pretraining(reading: Reading, record: dict) -> Conversation:
    reading.conv.format = "text"
    reading.check_keys(record, {"text", *METADATA_KEYS}, "record")
    text = record["text"]
    if not isinstance(text, str) or not text.strip():
        raise reading.error("'text' is empty or not a string", "give the pre-training text as a string", field="text")
    reading.conv.pretrain_text = text
    return reading.conv


def iter_conversations(
    paths: Iterable[str | Path], ignore_unknown_fields: bool = False, stage: str = "sft"
) -> Iterator[Conversation | DataError]:
    """Every sample of every file, as a Conversation or as the DataError that describes it."""
    for path in paths:
        file = str(path)
        for index, (where, record) in enumerate(read_records(path)):
            try:
                yield parse_record(record, file, where, index, ignore_unknown_fields, stage)
            except DataError as e:
                yield e
