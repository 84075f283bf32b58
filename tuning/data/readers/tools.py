"""Tool calling in its OpenAI shape, whatever the source wrote: the `tools` list and assistant tool calls.

Templates (and inference servers such as vLLM) receive tools as {"type": "function", "function": spec} and
tool calls as {"type": "function", "function": {"name", "arguments"}} with `arguments` an object, so that is
the one shape here: JSON strings (LLaMA-Factory, ms-swift, the OpenAI API) are parsed, bare specs wrapped.
"""

from __future__ import annotations

import json

from tuning.data.readers.common import Reading


def parse_tools(reading: Reading, value) -> list[dict] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = _json(reading, value, "tools", "a JSON list of function specs")
    if not isinstance(value, list):
        raise reading.error(f"'tools' must be a list of function specs, found {value!r:.60}", field="tools")
    tools = []
    for spec in value:
        if isinstance(spec, dict) and spec.get("type") == "function" and isinstance(spec.get("function"), dict):
            spec = spec["function"]
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise reading.error(
                f"tool {spec!r:.80} has no name",
                'write each tool as {"type": "function", "function": {"name", "description", "parameters"}}',
                field="tools",
            )
        tools.append({"type": "function", "function": spec})
    return tools or None


def parse_tool_calls(reading: Reading, value, index: int, key: str) -> list[dict]:
    """OpenAI `tool_calls`, or the JSON {"name", "arguments"} (or a list of them) of a function_call message."""
    if isinstance(value, str):
        value = _json(reading, value, key, 'a JSON object {"name": ..., "arguments": {...}}', index)
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise reading.error(f"'{key}' is empty", "give at least one call, or drop the field", index, key)
    return [_call(reading, call, index, key) for call in calls]


def _call(reading: Reading, call, index: int, key: str) -> dict:
    if not isinstance(call, dict):
        raise reading.error(f"tool call {call!r:.60} is not an object", message_index=index, field=key)
    function = call.get("function", call) if call.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise reading.error(
            f"tool call {call!r:.80} has no function name",
            'write {"type": "function", "function": {"name": ..., "arguments": {...}}}',
            index,
            key,
        )
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _json(reading, arguments, key, "arguments as a JSON object", index) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise reading.error(f"the arguments of {function['name']!r} are not an object", message_index=index, field=key)
    normalized = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        normalized["id"] = call["id"]
    return normalized


def _json(reading: Reading, text: str, key: str, expected: str, index: int | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise reading.error(f"'{key}' is not valid JSON ({e.msg})", f"write {expected}", index, key) from None
