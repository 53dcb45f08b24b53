"""ShareGPT conversations → segments.

A row holds `conversations` (or another message list, see `auto.py`): items `{"from", "value"}`
with `from` one of `system`, `human`/`user`, `gpt`/`assistant`/`chatgpt`/`model`,
`function_call` (the assistant's call: `value` is the call's JSON, an object or a list of
`{"name", "arguments"}`), `observation`/`tool`/`function`/`function_response` (a tool's answer);
`--role-map FROM=ROLE` names any other `from`. The typed-parts variant holds `value` (or
`content`) as a list of parts, as in the OpenAI format. `tools` may be a JSON string; a top-level
`system` string is the system prompt.
"""

from __future__ import annotations

import json
from typing import Any

from dostream.importers.base import Builder, Provenance, RecordError, checked_call, checked_tools, message_author
from dostream.importers.openai import add_message
from dostream.stream import Segment

FROM_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "function_response": "tool",
    "ipython": "tool",
}


def to_segments(record: dict, messages: Any, where: str, tools: Any, prov: Provenance) -> tuple[list[Segment], int]:
    b = Builder()
    b.tools = checked_tools(tools, "tools")
    system = record.get("system")
    if isinstance(system, str) and system:
        b.add("context", "system", system)
    if not isinstance(messages, list):
        raise RecordError(where, f"expected a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        w = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(w, f"expected an object, got {type(m).__name__}")
        original = m.get("from", m.get("role"))
        if not isinstance(original, str):
            raise RecordError(f"{w}.from", "missing field" if original is None else "expected a string")
        key = "value" if "value" in m else "content"
        renamed = prov.role(original)
        if renamed == "function_call":
            b.add_calls(message_author(m, original, "assistant", prov, w), _calls(m.get(key), f"{w}.{key}"))
            continue
        add_message(b, m, original, FROM_ROLES.get(renamed, renamed), prov, w, content_key=key)
    return b.finish(), b.n_calls


def _calls(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(where, f"a function_call value that is not valid JSON ({e.msg})") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RecordError(where, "a function_call with no call")
    return [checked_call(c, f"{where}[{k}]" if isinstance(value, list) else where, k) for k, c in enumerate(items)]
