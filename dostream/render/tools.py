"""The chat-template path with tools: calls and the tool list written in the template's own syntax,
attributed by rendering without them; knows nothing of tokenisation (it returns pieces)."""

from __future__ import annotations

import re
from typing import Any

from dostream.render.pieces import _Piece, _tool_meta
from dostream.render.rendered import RenderError
from dostream.stream import Stream


def writes_tools(renderer) -> bool:
    """Does `renderer`'s chat template write tool calls and tool lists itself (asked once per renderer)?"""
    if not hasattr(renderer, "_writes_tools"):
        from dostream.toolcalls import template_supports_tools

        renderer._writes_tools = template_supports_tools(renderer.tok)
    return renderer._writes_tools


def tool_chat_pieces(
    renderer, stream: Stream, messages: list[dict[str, Any]], add_generation_prompt: bool
) -> list[_Piece]:
    """The template writes the tool list and the calls in its own syntax (`toolcalls.py`).

    A call segment (`meta.tool_calls`, no sampled ids) is passed as the message's `tool_calls`
    instead of its text form, and a tool-list segment (`meta.tools`) as `tools=`. Who wrote
    what the template adds is found by rendering the same conversation without the calls and
    without the tool list: the text that differs is the calls (the turn's author) or the tool
    list (`context`). Message contents are located by sentinels, as in the plain chat path;
    a message with no content gets none (templates often test `if message.content`)."""
    from dostream.toolcalls import call_parts, normalize_tool

    tools: list[dict] = []
    msgs: list[dict[str, Any]] = []  # {"role", "content": [(i, seg)], "calls": [(i, seg)], "turn"}
    for k, m in enumerate(messages):
        content, calls = [], []
        for i, seg in m["segments"]:
            kind = _tool_meta(seg)
            if kind == "tools":
                tools += seg.meta["tools"]
            else:
                (calls if kind == "calls" else content).append((i, seg))
        if content or calls:  # a system message that held only the tool list is the template's now
            msgs.append({"role": m["role"], "content": content, "calls": calls, "turn": k})
    if not msgs:
        raise RenderError(f"stream {stream.id!r}: a tool list and nothing else; nothing to render")
    tools = [normalize_tool(t) for t in tools]
    owners = [{seg.author for _, seg in m["calls"]} for m in msgs]
    for m, who in zip(msgs, owners):
        if len(who) > 1:
            raise RenderError(f"stream {stream.id!r}: one turn's tool calls have several authors ({sorted(who)})")
    texts = ["".join(seg.text for _, seg in m["content"]) for m in msgs]
    sentinels = [f"\u2063DOSTREAM{k}\u2063" if t else "" for k, t in enumerate(texts)]

    def conversation(contents: list[str], *, calls: Any = True) -> list[dict[str, Any]]:
        out = []
        for k, (m, c) in enumerate(zip(msgs, contents)):
            d: dict[str, Any] = {"role": m["role"], "content": c}
            if m["calls"] and (calls is True or k in calls):
                d["tool_calls"] = []
                for _, seg in m["calls"]:
                    for call in seg.meta["tool_calls"]:
                        name, args = call_parts(call)
                        d["tool_calls"].append(
                            {
                                "id": call.get("id"),
                                "type": "function",
                                "function": {"name": name, "arguments": args},
                            }
                        )
            for _, seg in m["content"]:  # a tool answer: which call it answers
                for key in ("tool_call_id", "name"):
                    if isinstance(seg.meta.get(key), str):
                        d.setdefault(key, seg.meta[key])
            out.append(d)
        return out

    def apply(conv: list[dict[str, Any]], with_tools: bool = True) -> str:
        return renderer.tok.apply_chat_template(
            conv,
            tools=(tools or None) if with_tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    try:
        templated = apply(conversation(sentinels))
        expected = apply(conversation(texts))
        no_calls = apply(conversation(sentinels, calls=())) if any(m["calls"] for m in msgs) else templated
        no_tools = apply(conversation(sentinels), with_tools=False) if tools else templated
    except Exception as e:  # the template refuses the conversation (e.g. tool answers without calls)
        raise RenderError(f"stream {stream.id!r}: the chat template failed on it: {e}") from None
    used = [k for k, t in enumerate(sentinels) if t]
    pattern = "|".join(map(re.escape, (sentinels[k] for k in used))) or "(?!)"
    chunks, chunks_nc, chunks_nt = (re.split(pattern, t) for t in (templated, no_calls, no_tools))
    found = [sentinels.index(x) for x in re.findall(pattern, templated)] if used else []
    if found != used or not len(chunks) == len(chunks_nc) == len(chunks_nt) == len(used) + 1:
        raise RenderError(f"stream {stream.id!r}: the chat template drops or repeats messages; use plain rendering")
    if expected != "".join(c + (texts[k] if j < len(used) else "") for j, (c, k) in enumerate(zip(chunks, used + [0]))):
        raise RenderError(
            f"stream {stream.id!r}: the chat template rewrites message content (e.g. strips whitespace), "
            "so characters cannot be attributed to their authors; use plain rendering"
        )

    pieces: list[_Piece] = []
    bounds = [-1] + used + [len(msgs)]
    for j, chunk in enumerate(chunks):
        lo, hi = bounds[j], bounds[j + 1]  # the chunk lies after message lo's content, before message hi's
        spans: list[tuple[int, int, str, int]] = []  # (start, end, author, turn) inside the chunk
        callers = [k for k in range(max(lo, 0), min(hi, len(msgs))) if msgs[k]["calls"]]
        for k in callers:
            if len(callers) == 1:
                other = chunks_nc[j]
            else:  # several call turns in one stretch of template text: one render per turn
                keep = [x for x in range(len(msgs)) if x != k]
                other = re.split(pattern, apply(conversation(sentinels, calls=keep)))[j]
            a, b = _differ(chunk, other, renderer._special)
            if b > a:
                spans.append((a, b, next(iter(owners[k])), msgs[k]["turn"]))
        a, b = _differ(chunk, chunks_nt[j], renderer._special)
        if b > a:
            spans.append((a, b, "context", msgs[0]["turn"]))
        spans.sort()
        if any(s[1] > t[0] for s, t in zip(spans, spans[1:])):
            raise RenderError(f"stream {stream.id!r}: cannot tell the template's tool text apart; use plain rendering")
        # Template text between the spans: an end-of-turn marker right after a turn's content,
        # calls or tool list belongs to that turn's author (and is dropped after an agent turn
        # that sampled it itself); the rest is protocol (context before the first message, as
        # in the plain chat path) and goes with the turn after it.
        last = msgs[lo]["content"][-1][1] if lo >= 0 else None
        prev = (last.author, msgs[lo]["turn"], last.text) if last is not None else None
        last_turn = msgs[min(hi, len(msgs) - 1)]["turn"]
        pos = 0
        for a, b, author, turn in spans + [(len(chunk), len(chunk), "", last_turn)]:
            gap = chunk[pos:a]
            if gap and j == 0:
                pieces.append(_Piece("context", gap, None, "template preamble", turn))
            elif gap:
                marker = next((t for t in renderer._special if gap.startswith(t)), None)
                if marker is not None and prev is not None:
                    if not prev[2].endswith(marker):
                        pieces.append(_Piece(prev[0], marker, None, "end of turn", prev[1]))
                    gap = gap[len(marker) :]
                pieces.append(_Piece("protocol", gap, None, "template text", turn))
            if b > a:
                pieces.append(_Piece(author, chunk[a:b], None, "template tool text", turn))
                prev = (author, turn, chunk[a:b])
            pos = b
        if j < len(used):
            m = msgs[hi]
            pieces += [_Piece(g.author, g.text, g.token_ids, f"segment {i}", m["turn"]) for i, g in m["content"]]
    return pieces


def _differ(a: str, b: str, specials: list[str] = ()) -> tuple[int, int]:
    """The span of `a` that is not in `b`, where `b` is `a` with one stretch taken out: `(start,
    end)` in `a`, empty when they are equal. Where several spans fit (`x<tool_call>..><y` without
    the block could lose `<tool_call>..>` or `tool_call>..><`), the leftmost one is taken that cuts
    no special token (`specials`) in two."""
    if a == b:
        return 0, 0
    n = min(len(a), len(b))
    s = 0
    while s < n and a[len(a) - 1 - s] == b[len(b) - 1 - s]:
        s += 1
    p = 0
    while p < n - s and a[p] == b[p]:
        p += 1
    start, end = p, len(a) - s
    inside = set()
    for t in specials:
        k = a.find(t)
        while k >= 0:
            inside.update(range(k + 1, k + len(t)))
            k = a.find(t, k + 1)
    while (start in inside or end in inside) and end < len(a) and a[start] == a[end]:
        start, end = start + 1, end + 1
    return start, end
