"""What every reader shares: roles, per-message training flags, the known keys and the refusals."""

from __future__ import annotations

from dataclasses import dataclass

from tuning.data.conversation import Conversation

ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",  # LLaMA-Factory's sharegpt
    "function": "tool",  # OpenAI's older function messages
    "tool_response": "tool",  # ms-swift
    "ipython": "tool",  # Llama 3.1
}
# An assistant message that is a tool call: LLaMA-Factory's sharegpt and ms-swift write it as a role of its own.
TOOL_CALL_ROLES = ("function_call", "tool_call")

# Keys that carry no training content: accepted and not used.
METADATA_KEYS = {"id", "source", "type", "image_wh", "parallel_tool_calls"}
MEDIA_KEYS = {"image", "images", "video", "videos", "objects"}
TRAIN_FLAGS = ("loss", "train", "weight")  # ms-swift, ours, OpenAI fine-tuning
PREFERENCE_KEYS = ("chosen", "rejected", "rejected_response", "rejected_messages", "rejected_images", "kto_tag")


@dataclass
class Reading:
    """One record being read: the Conversation it becomes, its base folder and the unknown-key policy."""

    conv: Conversation
    base_dir: str
    ignore_unknown: bool = False

    def error(self, problem: str, fix: str = "", message_index: int | None = None, field: str | None = None):
        return self.conv.error(problem, fix, message_index, field)

    def check_keys(self, mapping: dict, known: set[str], what: str, message_index: int | None = None) -> None:
        """Every key is read or named: an unknown one is an error, or with --ignore_unknown_fields a skipped one."""
        unknown = sorted(str(k) for k in mapping if k not in known)
        if not unknown:
            return
        if self.ignore_unknown:
            prefix = "" if message_index is None else "messages[]."
            self.conv.ignored_fields += tuple(prefix + k for k in unknown)
            return
        raise self.error(
            f"unknown {what} field(s) {', '.join(map(repr, unknown))}; the fields read here are "
            f"{', '.join(sorted(known))}",
            "rename or remove them, or pass --ignore_unknown_fields True to train without them",
            message_index,
            unknown[0],
        )


def role_of(reading: Reading, raw, index: int, key: str) -> str:
    """Our role for a data role; tool-call roles come back as they are for the caller to merge."""
    if raw in TOOL_CALL_ROLES:
        return raw
    if raw not in ROLES:
        allowed = ", ".join(sorted([*ROLES, *TOOL_CALL_ROLES]))
        raise reading.error(f"unknown role {raw!r}", f"use one of {allowed}", index, key)
    return ROLES[raw]


def trained_flag(reading: Reading, turn: dict, role: str, index: int) -> bool:
    """Whether an assistant turn is supervised: "loss"/"train" false or "weight" 0 make it context only."""
    trained = True
    for key in TRAIN_FLAGS:
        if key not in turn:
            continue
        value = turn[key]
        valid = (not isinstance(value, bool) and value in (0, 1)) if key == "weight" else isinstance(value, bool)
        if not valid:
            expected = "0 or 1" if key == "weight" else "true or false"
            raise reading.error(f"'{key}' is {value!r}", f"write {expected}", index, key)
        if value and role != "assistant":
            raise reading.error(
                f"'{key}' asks to train a {role} message", "only assistant turns are trained: remove it", index, key
            )
        trained = trained and bool(value)
    return trained


def refuse_unsupported(reading: Reading, record: dict, preference: str | None, stage: str) -> None:
    """Preference and KTO data never train as plain SFT, nor SFT data as a preference stage; audio not at all."""
    if preference is not None and stage in ("sft", "pt"):
        found = [k for k in (*PREFERENCE_KEYS, "label") if k in record]
        raise reading.error(
            f"preference data (field(s) {', '.join(found)}): this is for DPO, KTO or reward-model training, "
            "and training it as supervised fine-tuning would teach the answers it marks as bad",
            "train it with --stage dpo (or kto, rm); or for supervised fine-tuning drop the rejected answers and "
            "the label and keep only the answers to learn",
            field=found[0] if found else None,
        )
    if preference is None and stage not in ("sft", "pt"):
        raise reading.error(
            f"supervised data (no chosen and rejected answers, no label) given to --stage {stage}, which learns "
            "from preferences",
            "give preference records (prompt, chosen, rejected; for KTO a completion and its label), or train this "
            "data with --stage sft",
        )
    if "audios" in record:
        raise reading.error(
            "audio input ('audios'): no audio model is supported",
            "remove the audio samples, or use a toolkit with audio models",
            field="audios",
        )
