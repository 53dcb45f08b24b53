"""OpenAI chat messages → segments (also TRL's conversational rows and dostream's chat form).

`messages_to_segments(messages, tools=..., assistant="self"|"other")` is the one conversion of
OpenAI-shaped messages, used by `dostream import` and by the OpenAI-compatible server:

* roles `system`/`developer` (→ system), `user`, `assistant`, `tool`/`function`/`ipython` (→ tool);
* `content` a string, null, or a list of parts (text, reasoning, tool calls, tool results; a
  part's body under `text` or `value`, a call's `value` its object or JSON text);
* an assistant turn's reasoning (`reasoning_content` / `reasoning` on the message, reasoning
  parts, else a leading `<think>...</think>` block of its text) is a segment of its own before
  its text and calls (`meta.reasoning: true`, the turn's author); a message with sampled
  `token_ids` stays one segment, its ids exact;
* assistant `tool_calls` (name + JSON arguments) and the legacy `function_call`: one call segment
  in the text form of `toolcalls.py`, author the turn's; a call is never dropped, and an assistant
  turn with neither content nor a call is an error;
* `tool` messages keep `tool_call_id` and `name` in the segment's `meta`;
* per-message `author`, `weight` (0: context only) and `token_ids` (exact sampled ids: `agent`);
* the `tools` list becomes the tool preamble after the system prompt.

Who wrote what follows `base.py` (per message `author`/`weight` > `--role-map` > `--assistant`).
"""

from __future__ import annotations

from typing import Any

from dostream.importers.base import (
    Builder,
    Provenance,
    RecordError,
    add_assistant_text,
    checked_call,
    checked_tools,
    message_author,
    parse_content,
)
from dostream.stream import Segment


def messages_to_segments(
    messages: list[Any],
    *,
    tools: Any = None,
    assistant: str | None = None,
    role_map: dict[str, str] | None = None,
    where: str = "messages",
) -> list[Segment]:
    """OpenAI chat `messages` (+ the request's `tools`) → dostream segments (see the module
    docstring). `assistant`: `self` (the model being trained wrote the assistant turns: `agent`),
    `other` (someone else did: `teacher`), or None (then an assistant turn without its own
    `author`/`weight`/`token_ids` raises `ProvenanceError`). Raises `RecordError` naming the field
    (`messages[3].content`) for a message that cannot be converted."""
    prov = Provenance(assistant=assistant, role_map=dict(role_map or {}))
    b = Builder()
    b.tools = checked_tools(tools, "tools")
    add_messages(b, messages, prov, where)
    return b.finish()


def add_messages(b: Builder, messages: Any, prov: Provenance, where: str) -> None:
    """Append OpenAI-shaped messages to a builder."""
    if not isinstance(messages, list):
        raise RecordError(where, f"expected a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        w = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(w, f"expected an object, got {type(m).__name__}")
        original = m.get("role")
        if not isinstance(original, str):
            raise RecordError(f"{w}.role", "missing field" if original is None else "expected a string")
        add_message(b, m, original, prov.role(original), prov, w)


def add_message(
    b: Builder, m: dict, original: str, role: str, prov: Provenance, w: str, *, content_key: str = "content"
) -> None:
    """One message (its role already resolved; its text under `content_key`) → segments."""
    author = message_author(m, original, role, prov, w)
    b.begin()
    meta = dict(m["meta"]) if isinstance(m.get("meta"), dict) else {}
    content = m.get(content_key)
    parts = parse_content(content, f"{w}.{content_key}", tool=role == "tool")
    if role == "assistant":
        key = "reasoning_content" if m.get("reasoning_content") is not None else "reasoning"
        reasoning = m.get(key)
        if reasoning is not None and not isinstance(reasoning, str):
            raise RecordError(f"{w}.{key}", f"expected a string, got {type(reasoning).__name__}")
        if reasoning:
            parts.reasoning.insert(0, reasoning)
        calls = list(parts.calls)
        raw_calls = m.get("tool_calls")
        if raw_calls is not None:
            if not isinstance(raw_calls, list):
                raise RecordError(f"{w}.tool_calls", f"expected a list, got {type(raw_calls).__name__}")
            calls += [checked_call(c, f"{w}.tool_calls[{k}]", len(calls) + k) for k, c in enumerate(raw_calls)]
        if m.get("function_call") is not None:
            calls.append(checked_call(m["function_call"], f"{w}.function_call", len(calls)))
        text = "\n".join(parts.text)
        token_ids = m.get("token_ids")
        if token_ids is not None:
            # Sampled ids are exact text: the calls are already in it, as the model wrote them.
            if author != "agent":
                raise RecordError(f"{w}.token_ids", f"token_ids on a {author!r} message: only agent turns are sampled")
            if not isinstance(content, str):
                raise RecordError(f"{w}.{content_key}", "a message with token_ids needs its decoded text as content")
            if calls:
                meta["tool_calls"] = calls
            _add(b, author, role, content, meta, token_ids, f"{w}.token_ids")
            return
        if not text and not calls and not parts.reasoning:
            raise RecordError(f"{w}.{content_key}", "an assistant turn with neither content nor a tool call")
        add_assistant_text(b, author, text, parts.reasoning, meta)
        b.add_calls(author, calls)
        return
    if parts.calls:
        raise RecordError(
            f"{w}.{content_key}", f"a tool call in a {original!r} message: only assistant turns call tools"
        )
    for k in ("tool_call_id", "name"):
        if role == "tool" and isinstance(m.get(k), str):
            meta.setdefault(k, m[k])
    for text, result_meta in parts.results:  # tool results inside a user message (typed parts)
        b.begin()
        b.add(
            author if m.get("author") or "weight" in m else "tool", "tool", text, meta={**result_meta, **meta} or None
        )
    if parts.text or not parts.results:
        _add(b, author, role, "\n".join(parts.text), meta, None, w)


def _add(b: Builder, author: str, role: str, text: str, meta: dict, token_ids: Any, where: str) -> None:
    if token_ids is not None and (
        not isinstance(token_ids, list)
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids)
    ):
        raise RecordError(where, "expected a list of non-negative integers")
    b.add(author, role, text, meta=meta or None, token_ids=token_ids)


def to_segments(messages: Any, where: str, tools: Any, tools_where: str, prov: Provenance) -> tuple[list[Segment], int]:
    """A record's OpenAI messages (at field `where`) → (segments, number of tool calls)."""
    b = Builder()
    b.tools = checked_tools(tools, tools_where)
    add_messages(b, messages, prov, where)
    return b.finish(), b.n_calls
