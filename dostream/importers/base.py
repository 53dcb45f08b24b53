"""What every importer shares: provenance (who wrote a turn), content parts, the segment builder.

Provenance is a decision, never a silent default (docs/design.md, "Provenance of imported logs").
A message's author is, in this order:

1. its own `author` field (one of `stream.AUTHORS`);
2. `weight: 0` → `context` (kept in the context, never supervised); `weight: 1` changes nothing;
3. sampled `token_ids` → `agent` (the data says the model sampled it);
4. `--role-map ROLE=AUTHOR` for its role;
5. for the assistant role, `--assistant self` → `agent`, `--assistant other` → `teacher`; with
   neither, the import stops and asks (`ProvenanceError`);
6. the other roles: system/developer → `context`, user → `user`, tool/function/ipython → `tool`.

`--role-map ROLE=ROLE` renames a role instead (`gpt=assistant`, `observation=tool`): the right
side decides (a chat role name renames, an author name assigns).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dostream.errors import FieldError
from dostream.stream import AUTHORS, Segment
from dostream.toolcalls import (
    format_calls,
    format_reasoning,
    normalize_call,
    normalize_tool,
    split_reasoning,
    tools_preamble,
)

# Chat roles a segment is rendered in, and the names logs use for them.
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
ROLE_ALIASES: dict[str, str] = {"developer": "system", "function": "tool", "ipython": "tool"}
ROLE_AUTHORS: dict[str, str] = {"system": "context", "user": "user", "tool": "tool"}
ASSISTANT_AUTHORS: dict[str, str] = {"self": "agent", "other": "teacher"}

PROVENANCE_HELP = (
    "say who wrote the assistant turns: --assistant self if the model you are about to train sampled "
    "them (author agent: kept in the context, masked under the interventional view), --assistant other "
    "if another model or a person wrote them (author teacher: demonstrations, supervised). "
    "A message's own 'author' or 'weight' wins over either."
)


class RecordError(FieldError):
    """A record that cannot be imported (`errors.FieldError`). `field` is the path inside the record
    (`messages[3].content`); the reader adds the file and line (`stream.StreamError`)."""


class ProvenanceError(ValueError):
    """Assistant turns with no stated author and no `--assistant`: only the user can decide.
    `where` is the field of the first such turn (`messages[2]`)."""

    def __init__(self, where: str):
        self.where = where
        super().__init__(f"{where}: {PROVENANCE_HELP}")


@dataclass
class Provenance:
    """Who wrote what: `assistant` is `self`, `other` or None (ask); `role_map` maps a role to an
    author (`assistant=teacher`) or renames it (`gpt=assistant`)."""

    assistant: str | None = None
    role_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.assistant not in (None, *ASSISTANT_AUTHORS):
            raise ValueError(f"--assistant: expected self or other, got {self.assistant!r}")
        for role, target in self.role_map.items():
            if target not in AUTHORS and target not in ROLES and target not in ROLE_ALIASES:
                raise ValueError(
                    f"--role-map: {role}={target}: {target!r} is neither a role ({', '.join(ROLES)}) "
                    f"nor an author ({', '.join(AUTHORS)})"
                )

    def role(self, name: str) -> str:
        """The chat role a message's role name stands for (after `--role-map` renames and aliases)."""
        target = self.role_map.get(name)
        if target in ROLES or target in ROLE_ALIASES:
            name = target  # a rename (`gpt=assistant`; `human=user` renames and, as user is an author too, assigns)
        return ROLE_ALIASES.get(name, name)

    def author(self, original: str, role: str, where: str) -> str:
        """The author of a message with no author of its own (steps 4-6 of the module docstring)."""
        for name in (original, role):
            if self.role_map.get(name) in AUTHORS:
                return self.role_map[name]
        if role == "assistant":
            if self.assistant is None:
                raise ProvenanceError(where)
            return ASSISTANT_AUTHORS[self.assistant]
        if role in ROLE_AUTHORS:
            return ROLE_AUTHORS[role]
        raise RecordError(
            f"{where}.role",
            f"unknown role {original!r}: map it with --role-map {original}=ROLE (one of {', '.join(ROLES)}) "
            f"or {original}=AUTHOR",
        )


def parse_role_map(spec: str | None) -> dict[str, str]:
    """`--role-map 'gpt=assistant,assistant=teacher'` → `{"gpt": "assistant", "assistant": "teacher"}`.
    Errors name the flag."""
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        role, sep, target = (x.strip() for x in item.partition("="))
        if not sep or not role or not target:
            raise ValueError(f"--role-map: expected ROLE=AUTHOR or ROLE=ROLE, got {item!r}")
        out[role] = target
    Provenance(role_map=out)  # validates the targets
    return out


def message_author(msg: dict, original_role: str, role: str, prov: Provenance, where: str) -> str:
    """Steps 1-6 of the module docstring for one message (`msg` is the raw record)."""
    author = msg.get("author")
    if author is not None:
        if author not in AUTHORS:
            raise RecordError(f"{where}.author", f"unknown author {author!r} (expected one of {', '.join(AUTHORS)})")
        return author
    if "weight" in msg:
        w = msg["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
            raise RecordError(f"{where}.weight", f"expected 0 (context only) or 1, got {w!r}")
        if w == 0:
            return "context"
    if msg.get("token_ids") is not None and role == "assistant":
        return "agent"
    return prov.author(original_role, role, where)


@dataclass
class Parts:
    """What a message's content holds: text, reasoning, tool calls, tool results."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)
    results: list[tuple[str, dict]] = field(default_factory=list)  # (text, meta) of tool results


_TEXT_PARTS = ("text", "input_text", "output_text")
_REASONING_PARTS = ("reasoning", "thinking", "reasoning_text")
_CALL_PARTS = ("tool_call", "tool_use", "function_call", "function")
_RESULT_PARTS = ("tool_result", "function_call_output", "tool_response")


def _as_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_as_text(v.get("text", v) if isinstance(v, dict) else v, where) for v in value)
    if value is None:
        return ""
    raise RecordError(where, f"expected a string, got {type(value).__name__}")


def parse_content(content: Any, where: str, *, tool: bool = False) -> Parts:
    """A message's `content`: a string, null, or a list of typed parts (`text`, `reasoning` /
    `thinking`, `tool_call` / `tool_use` / `function_call`, `tool_result`; plain strings count as
    text). A part's body is under `text` (or `value`, LLaMA-Factory's spelling; `thinking`,
    `reasoning` or `summary` for reasoning); a call is `name` + `arguments`/`input`, a `function`
    object, or a `value` holding the call object or its JSON text (`_value_calls`). Text parts are
    joined with newlines. A tool's content may also be any JSON value (kept as its JSON text). Parts
    dostream cannot hold as text (images, audio) are an error."""
    parts = Parts()
    if content is None:
        return parts
    if isinstance(content, str):
        parts.text.append(content)
        return parts
    if isinstance(content, dict) and "type" in content:
        content = [content]
    if not isinstance(content, list):
        if tool:
            parts.text.append(json.dumps(content, ensure_ascii=False))
            return parts
        raise RecordError(where, f"expected a string, null or a list of parts, got {type(content).__name__}")
    for i, part in enumerate(content):
        w = f"{where}[{i}]"
        if isinstance(part, str):
            parts.text.append(part)
            continue
        if not isinstance(part, dict):
            raise RecordError(w, f"expected a string or an object, got {type(part).__name__}")
        kind = part.get("type", "text" if "text" in part or "value" in part else None)
        if kind in _TEXT_PARTS:
            key = "text" if "text" in part else "value"
            parts.text.append(_as_text(part.get(key), f"{w}.{key}"))
        elif kind in _REASONING_PARTS:
            key = next((k for k in ("text", "value", "thinking", "reasoning", "summary") if k in part), "text")
            parts.reasoning.append(_as_text(part.get(key), f"{w}.{key}"))
        elif kind in _CALL_PARTS and "value" in part:
            parts.calls += _value_calls(part["value"], f"{w}.value", len(parts.calls))
        elif kind in _CALL_PARTS:
            call = {
                "id": part.get("id") or part.get("call_id"),
                "name": part.get("name", (part.get("function") or {}).get("name")),
                "arguments": part.get("arguments", part.get("input", (part.get("function") or {}).get("arguments"))),
            }
            parts.calls.append(checked_call(call, w, len(parts.calls)))
        elif kind in _RESULT_PARTS:
            meta = {}
            cid = part.get("tool_use_id", part.get("call_id", part.get("tool_call_id")))
            if isinstance(cid, str):
                meta["tool_call_id"] = cid
            body = part.get("content", part.get("output", part.get("text", part.get("value"))))
            parts.results.append(
                (_as_text(body, f"{w}.content") if not isinstance(body, dict) else json.dumps(body), meta)
            )
        else:
            raise RecordError(
                f"{w}.type",
                f"content part of type {kind!r} has no text form (dostream streams hold text: "
                "text, reasoning, tool calls and tool results)",
            )
    return parts


def _value_calls(value: Any, where: str, index: int) -> list[dict]:
    """A typed part's `value` as calls: a call object, a list of them, or the JSON text of either
    (`{"type": "tool_call", "value": "{\\"name\\": ..., \\"arguments\\": {...}}"}`, as
    LLaMA-Factory writes it). Not JSON, no call or a call without a name: `RecordError` at `where`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(where, f"a tool call that is not valid JSON ({e.msg})") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RecordError(where, "a tool call part with no call")
    return [
        checked_call(c, f"{where}[{k}]" if isinstance(value, list) else where, index + k) for k, c in enumerate(items)
    ]


def checked_call(call: Any, where: str, index: int) -> dict:
    """One tool call in the OpenAI shape (`toolcalls.normalize_call`), errors naming the field."""
    try:
        return normalize_call(call, index)
    except ValueError as e:
        raise RecordError(where, str(e)) from None


def checked_tools(tools: Any, where: str) -> list[dict]:
    """A `tools` list (or its JSON text, as ShareGPT files store it), normalised."""
    if isinstance(tools, str):
        if not tools.strip():
            return []
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RecordError(where, f"a JSON string that is not valid JSON ({e.msg})") from None
    if tools is None:
        return []
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise RecordError(where, f"expected a list of tool definitions, got {type(tools).__name__}")
    out = []
    for i, t in enumerate(tools):
        try:
            out.append(normalize_tool(t))
        except ValueError as e:
            raise RecordError(f"{where}[{i}]", str(e)) from None
    return out


class Builder:
    """Collects the segments of one conversation in order.

    Call `begin()` before each message's segments. A tool call is a segment of its own (author: the assistant turn's, `meta.tool_calls`: the calls,
    text: their text form, after a newline when the turn has text before it), so a template that
    writes calls itself can replace it (`render/tools.py`); the tool list is a `context` segment in the
    system role (`meta.tools`, text: `toolcalls.tools_preamble`) after the system prompt."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.tools: list[dict] = []
        self.n_calls = 0
        self._new = False

    def begin(self) -> None:
        """A new message starts: its first segment is marked `meta.new_message` when it follows a
        segment of the same role (two tool answers in a row stay two messages when rendered)."""
        self._new = True

    def add(self, author: str, role: str, text: str, *, meta: dict | None = None, token_ids=None) -> None:
        # a role no template knows (`--role-map bot=oracle`) is left to the renderer's author → role map
        role = role if role in ROLES else None
        meta = dict(meta or {})
        if self._new and self.segments and self.segments[-1].role == role:
            meta["new_message"] = True
        self._new = False
        self.segments.append(Segment(author, text, token_ids=token_ids, role=role, meta=meta))

    def add_reasoning(self, author: str, reasoning: str, meta: dict | None = None) -> None:
        """A turn's reasoning: a segment of its own before the turn's text and calls, in the turn's
        role and author, `meta.reasoning: true`, its text `toolcalls.format_reasoning`."""
        self.add(author, "assistant", format_reasoning(reasoning), meta={**(meta or {}), "reasoning": True})

    def add_calls(self, author: str, calls: list[dict]) -> None:
        if not calls:
            return
        prev = self.segments[-1] if self.segments else None
        # a newline between a turn's text and its first call (what Hermes templates write); none
        # after reasoning alone, which ends with its blank line (what Qwen3's template writes)
        lead = (
            "\n"
            if not self._new
            and prev is not None
            and prev.role == "assistant"
            and prev.text
            and not prev.meta.get("reasoning")
            else ""
        )
        self.add(author, "assistant", lead + format_calls(calls), meta={"tool_calls": calls})
        self.n_calls += len(calls)

    def finish(self) -> list[Segment]:
        segments = list(self.segments)
        if self.tools:
            at = 0
            while at < len(segments) and segments[at].role == "system":
                at += 1
            lead = "\n\n" if any(s.text for s in segments[:at]) else ""
            segments.insert(
                at, Segment("context", lead + tools_preamble(self.tools), role="system", meta={"tools": self.tools})
            )
        return segments


def add_assistant_text(b: Builder, author: str, text: str, reasoning: list[str] | None = None, meta=None) -> None:
    """An assistant turn's reasoning and text, as segments: `reasoning` (reasoning parts,
    `reasoning_content`) if any, else a leading `<think>...</think>` block of the text
    (`toolcalls.split_reasoning`; only one that opens the text), becomes a reasoning segment
    (`Builder.add_reasoning`) before the text's. `meta` goes on the text's segment."""
    if reasoning:
        body: str | None = "\n".join(reasoning)
    else:
        body, text = split_reasoning(text)
    if body is not None:
        b.add_reasoning(author, body)
    if text:
        b.add(author, "assistant", text, meta=meta or None)
