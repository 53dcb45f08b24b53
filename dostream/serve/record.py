"""What the server records for a request: which conversation it continues, its new segments, its reply.

A client speaks OpenAI chat: every request carries the whole conversation so far. The server keeps
the conversation as a stream and must know which recorded sample a request continues, so that the
assistant turns it sampled keep their exact ids (docs/design.md invariant 2) and the next prompt is
rendered from the recorded stream:

* every message gets a canonical form (`canonical`: its role, text, calls, tool-call id and name;
  not how the client spelled them: `null` or `""`, a string or text parts);
* `prefix_states` hashes the request's tools and messages as a chain, one state per message;
* after sampling, choice c's *continuation key* is the chain extended by the reply the server
  returned (`continuation_key`); a later request whose messages up to an assistant message hash to
  a recorded key continues that choice: everything up to there is the recorded path (exact ids),
  and only the messages after it are new (`new_segments`, through the importers' one conversion
  `importers.openai.messages_to_segments`, with the tools preamble of `toolcalls.py`).

An assistant message that matches no recorded sample was written by someone else: it is recorded
as the client's (`teacher` by default, `--client-assistant AUTHOR` changes it).

`tool_choice` is enforced as vLLM enforces it, by constraining what the model may write
(`Preparer._grammar`, `sampling.grammar.tool_grammar`): under `required` every choice is a call to
one of the tools (the model picks the name among them by its own probabilities), under a named
function a call to that function, with arguments valid against the function's `parameters`; a
strict tool's arguments follow its schema under `auto` too, and `parallel_tool_calls: false` allows
one call a turn. A call the budget cut comes back as the text the model wrote (`finish_reason:
"length"`).
`StreamedContent` is the content a streamed choice may show while it is being drawn.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from dostream.render import decode
from dostream.sampling import Sample
from dostream.stream import Segment
from dostream.toolcalls import (
    CALL_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    call_parts,
    parse_calls,
    split_reasoning,
)

_VERSION = "dostream-serve-1"  # changes every key if the canonical form ever changes
_ROLES = {"developer": "system", "function": "tool", "ipython": "tool"}


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type", "text") in ("text", "input_text", "output_text"):
                out.append(str(part.get("text", "")))
            else:
                out.append(json.dumps(part, sort_keys=True, ensure_ascii=False))
        return "\n".join(out)
    return json.dumps(content, sort_keys=True, ensure_ascii=False)


def _calls(message: dict) -> list:
    out = []
    for call in message.get("tool_calls") or []:
        try:
            name, args = call_parts(call)
        except ValueError:
            name, args = None, call
        out.append([call.get("id") if isinstance(call, dict) else None, name, args])
    return out


def canonical(message: dict) -> str:
    """One message as the server compares it (not as the client spelled it)."""
    role = message.get("role")
    d = {"role": _ROLES.get(role, role), "content": _text(message.get("content"))}
    if d["role"] == "assistant":
        d["calls"] = _calls(message)
    for k in ("name", "tool_call_id"):
        if isinstance(message.get(k), str):
            d[k] = message[k]
    return json.dumps(d, sort_keys=True, ensure_ascii=False)


def _chain(state: str, item: str) -> str:
    return hashlib.sha256(f"{state}\0{item}".encode()).hexdigest()


def prefix_states(tools: list[dict] | None, messages: list[dict], start: str | None = None) -> list[str]:
    """The hash chain after each message (the tools in force are hashed first); `start`: the chain
    goes on from a recorded choice's continuation key instead (the messages follow that choice)."""
    state = start or _chain(_VERSION, json.dumps(tools or [], sort_keys=True, ensure_ascii=False))
    out = []
    for m in messages:
        state = _chain(state, canonical(m))
        out.append(state)
    return out


def lookup_keys(messages: list[dict], states: list[str]) -> list[str | None]:
    """Keys to look up: a prefix can continue a recorded sample only where it ends with an assistant message."""
    return [s if m.get("role") == "assistant" else None for m, s in zip(messages, states)]


def continuation_key(states: list[str], reply: dict) -> str:
    """The key a later request has when it sends this request's messages and then `reply` back."""
    return _chain(states[-1], canonical(reply))


_INDEX = re.compile(r"^messages\[(\d+)\]")


def new_segments(messages: list[dict], offset: int, tools: list[dict] | None, author: str) -> list[Segment]:
    """The segments of `messages` (the request's messages from index `offset` on): by role,
    `system`/`developer` → `context`, `user` → `user`, `tool` → `tool`, an assistant message (one
    that matched no sample) → `author`; `tools` (a new conversation only) → the tools preamble.
    Raises `ValueError(field, message)` with the field named in the request (`messages[3].content`)."""
    from dostream.importers.base import RecordError
    from dostream.importers.openai import messages_to_segments

    role_map = {} if author == "teacher" else {"assistant": author}
    try:
        return messages_to_segments(messages, tools=tools, assistant="other", role_map=role_map, where="messages")
    except RecordError as e:
        where = _INDEX.sub(lambda m: f"messages[{int(m.group(1)) + offset}]", e.field)
        raise FieldError(where, e.reason) from None


class FieldError(__import__("dostream.errors", fromlist=["FieldError"]).FieldError):  # the one field error (errors.py)
    """A request field that cannot be recorded: `field` names it as the client wrote it."""

    def __init__(self, field: str, message: str):
        self.field, self.reason = field, message
        super().__init__(f"{field}: {message}")


def _visible(sample_text: str, finish: str, tok, sample: Sample, stop: tuple[str, ...]) -> str:
    """The text less the end-of-turn token it sampled and less a stop string and what followed it."""
    text = sample_text
    if finish == "eos" and sample.token_ids:
        end = decode(tok, sample.token_ids[-1:])
        if end and text.endswith(end):
            text = text[: -len(end)]
    elif finish == "stop":
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
    return text


def reply(sample: Sample, tok, stop: tuple[str, ...], *, tools: bool, call_prefix: str) -> tuple[dict, str]:
    """The OpenAI `message` for a sample and its `finish_reason`.

    The content is what the model wrote, less the end-of-turn token it sampled and less a stop
    string and what followed it in its last token (as OpenAI returns it); with tools in force,
    `<tool_call>` blocks become `tool_calls`. A turn the budget cut is `finish_reason: "length"`
    with whatever the model wrote: its whole calls as `tool_calls` (a last one whose JSON is whole
    but whose `</tool_call>` never came included) and the rest as the content (a call it had not
    finished stays text there, as vLLM returns it), never an empty message. A thinking model's leading `<think>...</think>`
    block comes back as `reasoning_content` (as OpenAI-compatible servers for DeepSeek/Qwen-style
    models return it), the rest as the content. The recorded segment keeps every sampled id."""
    text = _visible(sample.text, sample.finish_reason, tok, sample, stop)
    reasoning, text = split_reasoning(text)
    if reasoning is None and text.lstrip().startswith(THINK_OPEN):  # cut while thinking: all reasoning
        reasoning, text = text.lstrip()[len(THINK_OPEN) :].strip("\n"), ""
    calls: list[dict] = []
    if tools:
        text, calls = parse_calls(text, id_prefix=call_prefix)
    message: dict[str, Any] = {"role": "assistant", "content": text if (text or not calls) else None}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    finish = "length" if sample.finish_reason == "length" else ("tool_calls" if calls else "stop")
    return message, finish


def settled(text: str, markers: list[str]) -> str:
    """What of a text being drawn may be shown: `text` cut at the first marker (a stop string, an
    end-of-turn token's text), less a tail that could begin one, less an unfinished character."""
    cut = min((i for i in (text.find(m) for m in markers) if i >= 0), default=len(text))
    text = text[:cut]
    for k in range(min(len(text), max(map(len, markers), default=1) - 1), 0, -1):
        if any(m.startswith(text[-k:]) for m in markers):  # could become a marker
            text = text[:-k]
            break
    return text.rstrip("\ufffd")


class StreamedContent:
    """One streamed choice while it is drawn: `push(token)` returns the delta to send
    (`{"content": ...}` and/or `{"reasoning_content": ...}`), always a prefix of what `reply` gives
    at the end (`rest(message)` is the delta that is left).

    Held back until it is settled: text from a stop string, an end-of-turn token or (tools in
    force) `<tool_call>` on, a tail that could begin one of those, an unfinished UTF-8 character;
    with tools, leading and trailing whitespace (the final content is stripped). A leading
    `<think>` block streams as `reasoning_content` (its tail that could begin `</think>` held
    back); the content starts after it closes."""

    def __init__(self, tok, stop: tuple[str, ...], eos: set[int], *, tools: bool):
        self.tok, self.tools = tok, tools
        self.markers = [*stop, *(decode(tok, [e]) for e in sorted(eos))] + ([CALL_OPEN] if tools else [])
        self.markers = [m for m in self.markers if m]
        self.ids: list[int] = []
        self.sent = ""
        self.sent_reasoning = ""

    def push(self, token: int) -> dict[str, str]:
        self.ids.append(token)
        text = settled(decode(self.tok, self.ids), self.markers)
        head = text.lstrip()
        delta: dict[str, str] = {}
        if head.startswith(THINK_OPEN) or (head and THINK_OPEN.startswith(head)):
            if THINK_CLOSE not in head:  # still thinking: stream the reasoning, hold the content
                body = settled(head[len(THINK_OPEN) :], [THINK_CLOSE]).lstrip("\n").rstrip("\n")
                if new := self._new(body, "sent_reasoning"):
                    delta["reasoning_content"] = new
                return delta
            reasoning, text = split_reasoning(text)
            if new := self._new(reasoning or "", "sent_reasoning"):
                delta["reasoning_content"] = new
        if self.tools:
            text = text.strip()
        if new := self._new(text, "sent"):
            delta["content"] = new
        return delta

    def _new(self, text: str, attr: str) -> str:
        sent = getattr(self, attr)
        if len(text) <= len(sent) or not text.startswith(sent):
            return ""
        setattr(self, attr, text)
        return text[len(sent) :]

    def rest(self, message: dict) -> dict[str, str]:
        delta = {}
        for key, sent in (("reasoning_content", self.sent_reasoning), ("content", self.sent)):
            full = message.get(key) or ""
            if full.startswith(sent) and full[len(sent) :]:
                delta[key] = full[len(sent) :]
        return delta
