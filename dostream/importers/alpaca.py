"""Alpaca rows → segments: `instruction` (+ `input`) is the user turn, `output` the assistant's.

An optional `system` is the system prompt and an optional `history` (a list of
`[instruction, output]` pairs, as LLaMA-Factory writes it) comes before the row's own turn. The
instruction and its input are joined by a blank line. An output that opens with a `<think>...</think>`
block has it as its reasoning segment (`base.add_assistant_text`).
"""

from __future__ import annotations

from dostream.importers.base import Builder, Provenance, RecordError, add_assistant_text, message_author
from dostream.stream import Segment


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RecordError(key, "missing field" if value is None else f"expected a string, got {type(value).__name__}")
    return value


def to_segments(record: dict, prov: Provenance) -> tuple[list[Segment], int]:
    b = Builder()
    system = _text(record, "system", required=False)
    if system:
        b.add("context", "system", system)
    author = message_author(record, "assistant", "assistant", prov, "output")
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history", f"expected a list of [instruction, output] pairs, got {type(history).__name__}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError(f"history[{i}]", "expected an [instruction, output] pair of strings")
        b.add("user", "user", pair[0])
        add_assistant_text(b, author, pair[1])
    instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
    b.add("user", "user", instruction + ("\n\n" + extra if extra else ""))
    output = _text(record, "output")
    if not output:
        raise RecordError("output", "an assistant turn with neither content nor a tool call")
    add_assistant_text(b, author, output)
    return b.finish(), 0
