"""Which format a record is in, where its message list is, and the conversion to segments.

Per record (`--format auto`): `segments` → `dostream`; `instruction` + `output` → `alpaca`;
`prompt` + `completion` → `trl`; otherwise a message list, found under `--messages-key` (a dotted
path such as `data.traj`) or, by default, under the first of `MESSAGE_KEYS` that holds a list of
message objects, at the top or nested up to three objects deep (`{"traj": {"messages": [...]}}`),
else under any key holding a list of objects with `role` or `from`. Items with `from` are
ShareGPT, items with `role` OpenAI (which TRL's conversational rows and dostream's chat form are).
The `tools` list is looked up beside the message list, then at the top of the record.
"""

from __future__ import annotations

from typing import Any

from dostream.importers import alpaca, openai, sharegpt, trl
from dostream.importers.base import Provenance, RecordError
from dostream.stream import Segment

FORMATS: tuple[str, ...] = ("auto", "openai", "sharegpt", "alpaca", "trl", "dostream")
MESSAGE_KEYS: tuple[str, ...] = (
    "messages",
    "conversations",
    "conversation",
    "traj",
    "trajectory",
    "history",
    "dialog",
    "dialogue",
    "chat",
    "turns",
)
ID_KEYS: tuple[str, ...] = ("id", "conversation_id", "uuid")


def _looks_like_messages(value: Any, *, empty_ok: bool) -> bool:
    if not isinstance(value, list):
        return False
    if not value:
        return empty_ok
    first = value[0]
    return isinstance(first, dict) and ("role" in first or "from" in first)


def find_messages(record: dict, key: str | None = None) -> tuple[str, list, dict] | None:
    """`(field path, message list, the object holding it)`, or None when there is none."""
    if key:
        node: Any = record
        parent: dict = record
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise RecordError(key, "missing field (--messages-key)")
            parent, node = node, node[part]
        if not isinstance(node, list):
            raise RecordError(key, f"expected a list of messages (--messages-key), got {type(node).__name__}")
        return key, node, parent
    frontier: list[tuple[str, dict]] = [("", record)]
    for _ in range(3):  # by known names, level by level
        nxt: list[tuple[str, dict]] = []
        for path, obj in frontier:
            for k in MESSAGE_KEYS:
                if _looks_like_messages(obj.get(k), empty_ok=True):
                    return path + k, obj[k], obj
            nxt += [(f"{path}{k}.", v) for k, v in obj.items() if isinstance(v, dict)]
        frontier = nxt
    for k, v in record.items():  # any list of message-like objects at the top
        if _looks_like_messages(v, empty_ok=False):
            return k, v, record
    return None


def detect(record: dict, messages_key: str | None = None) -> str:
    """The format of one record (see the module docstring); `RecordError` when none fits."""
    if "segments" in record and not messages_key:
        return "dostream"
    if "instruction" in record and "output" in record and not messages_key:
        return "alpaca"
    if "prompt" in record and "completion" in record and not messages_key:
        return "trl"
    found = find_messages(record, messages_key)
    if found is None:
        raise RecordError(
            "",
            "cannot tell the format: no message list (messages, conversations, traj, history, ...; "
            "--messages-key names another), no instruction/output, no prompt/completion, no segments",
        )
    items = found[1]
    return "sharegpt" if items and isinstance(items[0], dict) and "from" in items[0] else "openai"


def _tools(record: dict, holder: dict, path: str) -> tuple[Any, str]:
    prefix = path.rsplit(".", 1)[0] + "." if "." in path else ""
    for obj, where in ((holder, prefix), (record, "")):
        for k in ("tools", "functions"):
            if obj.get(k) is not None:
                return obj[k], where + k
    return None, "tools"


def convert(
    record: dict, fmt: str, prov: Provenance, messages_key: str | None = None
) -> tuple[list[Segment], int, str]:
    """One record → (segments, number of tool calls, the format it was read as)."""
    if fmt == "auto":
        fmt = detect(record, messages_key)
    if fmt == "dostream" and "segments" in record:
        from dostream import stream as _stream

        try:  # the stream file's own reader: one definition of a segment
            s = _stream.stream_from_json({"id": "-", **{k: record[k] for k in ("segments", "meta") if k in record}})
        except _stream._FieldError as e:
            raise RecordError(e.field, e.message) from None
        return s.segments, 0, fmt
    if fmt == "alpaca":
        return (*alpaca.to_segments(record, prov), fmt)
    if fmt == "trl" and "messages" not in record:
        tools, _ = _tools(record, record, "")
        return (*trl.to_segments(record, prov, tools), fmt)
    found = find_messages(record, messages_key)
    if found is None:
        raise RecordError(messages_key or "messages", f"missing field (no message list for --format {fmt})")
    path, messages, holder = found
    tools, tools_where = _tools(record, holder, path)
    if fmt == "sharegpt":
        return (*sharegpt.to_segments(record, messages, path, tools, prov), fmt)
    return (*openai.to_segments(messages, path, tools, tools_where, prov), fmt)
