"""Rendering: a `Stream` → token ids with, for every token, the author who wrote it.

Two renderers share one rule: **every segment is tokenised on its own**, so a segment boundary is
always a token boundary. No token ever straddles two authors (invariant 1 holds by construction),
rendering is prefix-stable (the ids of a stream's first k segments are a prefix of the whole
stream's ids: what the model saw while sampling is what it is trained on), and agent segments with
sampled `token_ids` are emitted as those exact ids, never re-tokenised (invariant 2).

* plain: segments concatenated verbatim, then the end-of-sequence token, owned by the author of the
  last segment (the world's answer ends there; an agent that sampled its own EOS keeps it).
* chat template: the tokenizer's own template. Template text (role headers, turn markers) is
  authored `protocol`, the preamble before the first message (e.g. a default system prompt) is
  `context`, and the end-of-turn marker right after a message belongs to that message's author:
  the agent's decision to stop is its action; a teacher's turn end is supervised.

Labels come from one place, `Rendered.labels(view)`: supervised = True ⇔ the token's author is in
the view; -100 elsewhere. Position 0 is never supervised (nothing precedes it to predict it from).

>>> from dostream.models import load_tokenizer          # doctest: +SKIP
>>> r = Renderer(load_tokenizer("smollm2")).render(stream)  # doctest: +SKIP
>>> r.labels("interventional")                          # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from dostream.stream import Segment, Stream, view_authors

IGNORE = -100

# How `Rendered.truncate` shortens a row: `left` keeps the most recent tokens, `right` the first
# ones, `turns` keeps the head context (the leading `context` tokens: system prompt, tool list, the
# template's preamble) and drops whole turns after it, oldest first (then, if the newest turn alone
# is still too long, its oldest tokens); `auto` is `turns` for a rendering that has a head, else
# `left`.
TRUNCATION_SIDES: tuple[str, ...] = ("left", "right", "turns", "auto")

# Where a segment without an explicit role sits in a chat template.
AUTHOR_ROLES: dict[str, str] = {
    "context": "system",
    "agent": "assistant",
    "teacher": "assistant",
    "oracle": "assistant",
    "tool": "tool",
    "user": "user",
    "verifier": "user",
    "environment": "user",
    "protocol": "user",
}


def decode(tokenizer, ids: list[int]) -> str:
    """The one decoding rule for sampled ids: nothing skipped, nothing cleaned up. The sampler
    writes agent text with it and the renderer checks agent text against it."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class RenderError(ValueError):
    """A stream cannot be rendered faithfully (the message names the stream and segment)."""


@dataclass
class Rendered:
    """One rendered stream. All per-token lists have the same length."""

    id: str
    text: str
    input_ids: list[int]
    authors: list[str]
    offsets: list[tuple[int, int] | None]
    segments: list[dict[str, Any]] = field(default_factory=list)  # {"author", "start", "end"} into text
    # Where turns start (token indices, ascending) and how many leading tokens are head context:
    # what `truncate(..., "turns")` keeps and drops. Not part of the render record.
    turn_starts: list[int] = field(default_factory=list)
    head: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def supervised(self, view: str | Iterable[str]) -> list[bool]:
        """Per token: is it supervised under `view`? (position 0 never is)."""
        keep = view_authors(view)
        return [i > 0 and a in keep for i, a in enumerate(self.authors)]

    def labels(self, view: str | Iterable[str]) -> list[int]:
        """The one place a supervision mask becomes labels: the token id, or -100."""
        return [t if s else IGNORE for t, s in zip(self.input_ids, self.supervised(view))]

    def to_json(self, view: str | Iterable[str]) -> dict[str, Any]:
        """The public `dostream render` record (docs/design.md)."""
        return {
            "id": self.id,
            "text": self.text,
            "input_ids": self.input_ids,
            "labels": self.labels(view),
            "offsets": [list(o) if o is not None else None for o in self.offsets],
            "authors": self.authors,
            "segments": self.segments,
        }

    def truncate(self, max_length: int, side: str = "left") -> Rendered:
        """Keep `max_length` tokens: the most recent ones (`left`, the default: the newest evidence
        matters most in a stream), the first ones (`right`), or the head context and the newest
        whole turns (`turns`: the system prompt and tool list stay, the oldest turns after them go
        first; `auto`: `turns` where there is a head, else `left`). See `TRUNCATION_SIDES`. Text,
        offsets and segments are cut to match (under `turns` the text is the head's followed by the
        kept turns')."""
        if max_length <= 0:
            raise ValueError("max_length must be positive")
        if len(self) <= max_length:
            return self
        if side not in TRUNCATION_SIDES:
            raise ValueError(f"truncation side must be one of {', '.join(TRUNCATION_SIDES)}, got {side!r}")
        n = len(self)
        if side == "auto":
            side = "turns" if self.head else "left"
        if side == "turns" and 0 < self.head < max_length:
            budget = max_length - self.head
            # the oldest turn start after the head from which the rest fits; else cut inside the newest turn
            start = next((t for t in self.turn_starts if t >= self.head and n - t <= budget), n - budget)
            return self._cut(0, self.head)._join(self._cut(start, n))
        if side == "right":
            return self._cut(0, max_length)
        return self._cut(n - max_length, n)  # left; and `turns` when the head alone does not fit

    def _cut(self, a: int, b: int) -> Rendered:
        """Tokens [a, b) with their text, offsets and segments, rebased to start at 0."""
        sl = slice(a, b)
        offsets = self.offsets[sl]
        spans = [o for o in offsets if o is not None]
        lo = min(s for s, _ in spans) if spans else 0
        hi = max(e for _, e in spans) if spans else 0
        segments = [
            {"author": s["author"], "start": max(s["start"], lo) - lo, "end": min(s["end"], hi) - lo}
            for s in self.segments
            if s["end"] > lo and s["start"] < hi
        ]
        return replace(
            self,
            text=self.text[lo:hi],
            input_ids=self.input_ids[sl],
            authors=self.authors[sl],
            offsets=[None if o is None else (o[0] - lo, o[1] - lo) for o in offsets],
            segments=segments,
            turn_starts=[t - a for t in self.turn_starts if a < t < b],
            head=max(0, min(self.head, b) - a),
        )

    def _join(self, other: Rendered) -> Rendered:
        """This rendering followed by `other` (e.g. the head and the kept turns)."""
        shift = len(self.text)
        return replace(
            self,
            text=self.text + other.text,
            input_ids=self.input_ids + other.input_ids,
            authors=self.authors + other.authors,
            offsets=self.offsets + [None if o is None else (o[0] + shift, o[1] + shift) for o in other.offsets],
            segments=self.segments
            + [{**s, "start": s["start"] + shift, "end": s["end"] + shift} for s in other.segments],
            turn_starts=self.turn_starts + [len(self)] + [t + len(self) for t in other.turn_starts],
        )


@dataclass
class _Piece:
    author: str
    text: str
    token_ids: list[int] | None = None
    where: str = ""  # for error messages
    turn: int = 0  # the turn (message) it belongs to, for truncation by turns


class Renderer:
    """Turns streams into `Rendered` token sequences for one tokenizer.

    `chat_template=True` uses the tokenizer's own chat template (segments are grouped into
    messages by role: a segment's `role`, else `AUTHOR_ROLES[author]`; consecutive segments with
    the same role share one message). `add_eos` closes plain renderings with the EOS token.
    """

    def __init__(self, tokenizer, *, chat_template: bool = False, add_eos: bool = True):
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise RenderError(f"{type(tokenizer).__name__} has no chat template: render in plain mode")
        self.tok = tokenizer
        self.chat_template = chat_template
        self.add_eos = add_eos
        self._special = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)

    # -- public -----------------------------------------------------------------------------
    def render(self, stream: Stream, *, add_generation_prompt: bool = False) -> Rendered:
        """Render one stream. `add_generation_prompt` (chat mode) appends the template's opening of
        an assistant turn, authored `protocol`, ready for sampling."""
        try:
            if self.chat_template:
                pieces = self._chat_pieces(stream, add_generation_prompt)
            else:
                turns = [k for k, m in enumerate(_messages(stream)) for _ in m["segments"]]
                pieces = [
                    _Piece(s.author, s.text, s.token_ids, f"segment {i}", turns[i])
                    for i, s in enumerate(stream.segments)
                ]
                if self.add_eos and not add_generation_prompt:
                    pieces.append(self._eos_piece(pieces))
            return self._tokenize(stream.id, pieces)
        except RenderError as e:
            if stream.source is None:
                raise
            raise RenderError(f"{stream.source}: {e}") from None

    def prompt_ids(self, stream: Stream) -> list[int]:
        """Ids to condition sampling on: the stream so far, open for the agent's next turn."""
        return self.render(stream, add_generation_prompt=True).input_ids

    # -- plain ------------------------------------------------------------------------------
    def _eos_piece(self, pieces: list[_Piece]) -> _Piece:
        eos_id = self.tok.eos_token_id
        if eos_id is None:
            raise RenderError("the tokenizer has no EOS token: pass add_eos=False")
        last = pieces[-1]
        if last.token_ids and last.token_ids[-1] == eos_id:
            return _Piece(last.author, "", [], "eos", last.turn)  # the agent already sampled its own EOS
        return _Piece(last.author, self.tok.eos_token, [eos_id], "eos", last.turn)

    # -- chat template ----------------------------------------------------------------------
    def _chat_pieces(self, stream: Stream, add_generation_prompt: bool) -> list[_Piece]:
        messages = _messages(stream)
        if any(_tool_meta(s) for s in stream.segments) and self._template_writes_tools():
            return self._chat_pieces_tools(stream, messages, add_generation_prompt)
        sentinels = [f"\u2063DOSTREAM{i}\u2063" for i in range(len(messages))]
        templated = self.tok.apply_chat_template(
            [{"role": m["role"], "content": sentinels[k]} for k, m in enumerate(messages)],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        between = re.split("|".join(map(re.escape, sentinels)), templated)
        if len(between) != len(messages) + 1:
            raise RenderError(f"stream {stream.id!r}: the chat template drops or repeats messages; use plain rendering")
        contents = ["".join(s.text for _, s in m["segments"]) for m in messages]
        expected = self.tok.apply_chat_template(
            [{"role": m["role"], "content": c} for m, c in zip(messages, contents)],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        if expected != "".join(b + c for b, c in zip(between, contents + [""])):
            raise RenderError(
                f"stream {stream.id!r}: the chat template rewrites message content (e.g. strips whitespace), "
                "so characters cannot be attributed to their authors; use plain rendering"
            )
        pieces = [_Piece("context", between[0], None, "template preamble")]
        for k, m in enumerate(messages):
            pieces += [_Piece(s.author, s.text, s.token_ids, f"segment {i}", k) for i, s in m["segments"]]
            after = between[k + 1]
            owner = m["segments"][-1][1]
            # The end-of-turn marker belongs to whoever wrote the turn. An agent that sampled the
            # marker itself already owns it in its token_ids, so the template's copy is dropped.
            marker = next((t for t in self._special if after.startswith(t)), None)
            if marker is not None:
                after = after[len(marker) :]
                if not owner.text.endswith(marker):
                    pieces.append(_Piece(owner.author, marker, None, f"end of turn {k}", k))
            # what follows is the next message's header: it goes with that turn
            pieces.append(_Piece("protocol", after, None, f"template after message {k}", min(k + 1, len(messages) - 1)))
        return pieces

    # -- chat template with tools -------------------------------------------------------------
    def _template_writes_tools(self) -> bool:
        if not hasattr(self, "_writes_tools"):
            from dostream.toolcalls import template_supports_tools

            self._writes_tools = template_supports_tools(self.tok)
        return self._writes_tools

    def _chat_pieces_tools(
        self, stream: Stream, messages: list[dict[str, Any]], add_generation_prompt: bool
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
            return self.tok.apply_chat_template(
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
        if expected != "".join(
            c + (texts[k] if j < len(used) else "") for j, (c, k) in enumerate(zip(chunks, used + [0]))
        ):
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
                a, b = _differ(chunk, other, self._special)
                if b > a:
                    spans.append((a, b, next(iter(owners[k])), msgs[k]["turn"]))
            a, b = _differ(chunk, chunks_nt[j], self._special)
            if b > a:
                spans.append((a, b, "context", msgs[0]["turn"]))
            spans.sort()
            if any(s[1] > t[0] for s, t in zip(spans, spans[1:])):
                raise RenderError(
                    f"stream {stream.id!r}: cannot tell the template's tool text apart; use plain rendering"
                )
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
                    marker = next((t for t in self._special if gap.startswith(t)), None)
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

    # -- tokenisation -----------------------------------------------------------------------
    def _tokenize(self, sid: str, pieces: list[_Piece]) -> Rendered:
        text_parts: list[str] = []
        ids: list[int] = []
        authors: list[str] = []
        offsets: list[tuple[int, int] | None] = []
        segments: list[dict[str, Any]] = []
        turn_starts: list[int] = []
        head, in_head, turn = 0, True, None
        pos = 0
        for p in pieces:
            if p.token_ids is not None:
                p_offsets = self._sampled_offsets(sid, p)
                p_ids = list(p.token_ids)
            elif p.text:
                enc = self.tok(p.text, add_special_tokens=False, return_offsets_mapping=True)
                p_ids = enc["input_ids"]
                p_offsets = _tile(enc["offset_mapping"])
            else:
                continue
            if turn is not None and p.turn != turn:
                turn_starts.append(len(ids))
            turn = p.turn
            in_head = in_head and p.author == "context"
            head += len(p_ids) if in_head else 0
            ids += p_ids
            authors += [p.author] * len(p_ids)
            offsets += [None if o is None else (o[0] + pos, o[1] + pos) for o in p_offsets]
            if p.text:
                segments.append({"author": p.author, "start": pos, "end": pos + len(p.text)})
            text_parts.append(p.text)
            pos += len(p.text)
        return Rendered(sid, "".join(text_parts), ids, authors, offsets, segments, turn_starts, head)

    def _sampled_offsets(self, sid: str, p: _Piece) -> list[tuple[int, int] | None]:
        """Character spans of sampled ids inside their own text, by incremental decoding.

        A token that decodes to part of a character (byte-level BPE splits emoji) gets `None`;
        the token that completes the character gets its span. Decoding restarts after every
        complete character, so the cost is linear in the segment length."""
        ids, text = p.token_ids, p.text
        vocab = len(self.tok)
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise RenderError(
                f"stream {sid!r}, {p.where} (agent): token id {bad} is not in the tokenizer's vocabulary "
                f"(ids 0..{vocab - 1}): were these ids sampled with another tokenizer?"
            )
        full = decode(self.tok, ids)
        if full != text:
            raise RenderError(
                f"stream {sid!r}, {p.where} (agent): token_ids decode to {full[:60]!r} but text is "
                f"{text[:60]!r}; sampled ids and text must agree"
            )
        offsets: list[tuple[int, int] | None] = []
        anchor_tok = anchor_char = 0
        for i in range(len(ids)):
            piece = decode(self.tok, ids[anchor_tok : i + 1])
            if not text.startswith(piece, anchor_char):
                if piece.endswith("\ufffd"):
                    offsets.append(None)  # an incomplete UTF-8 sequence so far
                    continue
                return self._sampled_offsets_slow(ids, text)  # a decoder that is not concatenative
            end = anchor_char + len(piece)
            offsets.append((anchor_char, end) if end > anchor_char else None)
            anchor_tok, anchor_char = i + 1, end
        return offsets

    def _sampled_offsets_slow(self, ids: list[int], text: str) -> list[tuple[int, int] | None]:
        """Whole-prefix decoding, for tokenizers whose decode of a suffix differs from the
        suffix of the decode (SentencePiece drops a leading space)."""
        offsets: list[tuple[int, int] | None] = []
        done = 0
        for i in range(len(ids)):
            prefix = decode(self.tok, ids[: i + 1])
            end = len(prefix) if text.startswith(prefix) else done
            offsets.append((done, end) if end > done else None)
            done = max(done, end)
        return offsets


def _messages(stream: Stream) -> list[dict[str, Any]]:
    """Segments grouped into chat messages: a segment's `role`, else `AUTHOR_ROLES[author]`;
    consecutive segments with the same role share one message, unless a segment's
    `meta.new_message` is true (two tool answers in a row, as imported logs have them).
    `{"role", "segments": [(i, seg)]}`."""
    messages: list[dict[str, Any]] = []
    for i, s in enumerate(stream.segments):
        role = s.role or AUTHOR_ROLES[s.author]
        if messages and messages[-1]["role"] == role and not s.meta.get("new_message"):
            messages[-1]["segments"].append((i, s))
        else:
            messages.append({"role": role, "segments": [(i, s)]})
    return messages


def _tool_meta(seg: Segment) -> str | None:
    """`"calls"` for a tool-call segment (its text is the text form of `meta.tool_calls`; sampled
    ids are exact text and stay text), `"tools"` for a tool-list segment (`meta.tools`), else None."""
    if seg.token_ids is None and isinstance(seg.meta.get("tool_calls"), list) and seg.meta["tool_calls"]:
        return "calls"
    if seg.author == "context" and isinstance(seg.meta.get("tools"), list) and seg.meta["tools"]:
        return "tools"
    return None


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


def _tile(spans: list[tuple[int, int]]) -> list[tuple[int, int] | None]:
    """Fast tokenizers give the byte-level pieces of one character (an emoji split in three
    tokens) overlapping spans. Make the spans tile the text: each token keeps only the characters
    no earlier token claimed, and a token left with none gets `None`."""
    out: list[tuple[int, int] | None] = []
    done = 0
    for s, e in spans:
        out.append((max(s, done), e) if e > done else None)
        done = max(done, e)
    return out


@dataclass
class RenderStats:
    """What rendering did with a collection of streams (`render_rows`, `encode_rows`): counts of
    rows kept, truncated and dropped, and the tokens of the kept rows by author, supervised or not."""

    streams: int = 0
    rows: int = 0
    truncated: int = 0
    dropped_no_supervised: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    tokens_by_author: dict[str, int] = field(default_factory=dict)
    supervised_by_author: dict[str, int] = field(default_factory=dict)
    truncated_tokens: int = 0  # tokens cut from the truncated rows
    max_length: int | None = None
    unsampled_agent_segments: int = 0  # agent segments (of kept rows) with no sampled token_ids
    plain_chat_streams: int = 0  # chat logs rendered without a chat template
    duplicate_ids: int = 0  # streams whose id an earlier stream had

    @property
    def supervised_frac(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    def report(self, view: str | Iterable[str]) -> list[str]:
        """Lines for the console: the supervised tokens by author, then warnings (a whole class of
        demonstrations masked, agent turns with no sampled ids all masked, truncation, chat logs
        rendered plain)."""
        name = view if isinstance(view, str) else ",".join(sorted(view))
        split = ", ".join(
            f"{a} {self.supervised_by_author.get(a, 0):,}/{n:,}"
            for a, n in sorted(self.tokens_by_author.items(), key=lambda kv: -kv[1])
        )
        lines = [
            f"supervised tokens by author under view {name!r}: {split or 'none'}; "
            f"total {self.supervised_tokens:,}/{self.tokens:,} ({self.supervised_frac:.1%}) in {self.rows} row(s)"
        ]
        for a in ("teacher", "oracle"):
            n = self.tokens_by_author.get(a, 0)
            if n and not self.supervised_by_author.get(a):
                lines.append(
                    f"warning: all {n:,} {a} tokens are masked under view {name!r}: demonstrations, usually supervised"
                )
        n = self.tokens_by_author.get("agent", 0)
        if n and not self.supervised_by_author.get("agent") and self.unsampled_agent_segments:
            lines.append(
                f"warning: all {n:,} agent tokens are masked under view {name!r}, and {self.unsampled_agent_segments:,} "
                "agent turn(s) carry no sampled token_ids: if another model or a person wrote them, they are "
                "demonstrations (author teacher: dostream import --assistant other)"
            )
        if self.truncated:
            lines.append(
                f"warning: {self.truncated} of {self.streams} row(s) truncated to {self.max_length} tokens, "
                f"{self.truncated_tokens:,} tokens cut"
            )
        if self.duplicate_ids:
            lines.append(
                f"warning: {self.duplicate_ids} stream(s) repeat an earlier stream's id "
                "(dostream import --dedupe keeps the first of each)"
            )
        if self.plain_chat_streams:
            lines.append(
                f"warning: {self.plain_chat_streams} stream(s) are chat logs rendered plain: their turns run "
                "together with nothing between them; --chat-template renders them with the tokenizer's template"
            )
        return lines


def _is_chat_log(stream: Stream) -> bool:
    """Every segment in an explicit chat role, a user and an assistant turn, and no protocol text
    between turns (dostream's environments write their own headers as protocol segments)."""
    roles = {s.role for s in stream.segments}
    return None not in roles and {"user", "assistant"} <= roles and all(s.author != "protocol" for s in stream.segments)


def render_rows(
    streams: Iterable[Stream],
    renderer: Renderer,
    view: str | Iterable[str],
    *,
    max_length: int | None = None,
    truncation_side: str = "left",
    stats: RenderStats | None = None,
    on_drop: Any = None,
) -> Iterable[tuple[Rendered, list[int]]]:
    """Render, truncate and label streams, yielding `(rendered, labels)` per kept row.

    Rows left with no supervised token (after truncation) are dropped and counted in `stats`,
    never kept (invariant 4): they would cost compute and, averaged naively, distort the loss.
    `on_drop(stream_id)` is called for each."""
    authors = view_authors(view)
    stats = stats if stats is not None else RenderStats()
    stats.max_length = max_length
    seen: set[str] = set()
    for stream in streams:
        stats.streams += 1
        stats.duplicate_ids += stream.id in seen
        seen.add(stream.id)
        r = renderer.render(stream)
        if not renderer.chat_template and _is_chat_log(stream):
            stats.plain_chat_streams += 1
        if max_length is not None and len(r) > max_length:
            n = len(r)
            r = r.truncate(max_length, truncation_side)
            stats.truncated += 1
            stats.truncated_tokens += n - len(r)
        labels = r.labels(authors)
        n_sup = sum(label != IGNORE for label in labels)
        if n_sup == 0:
            stats.dropped_no_supervised += 1
            if on_drop is not None:
                on_drop(r.id)
            continue
        stats.rows += 1
        stats.tokens += len(r)
        stats.supervised_tokens += n_sup
        stats.unsampled_agent_segments += sum(s.author == "agent" and s.token_ids is None for s in stream.segments)
        for a, label in zip(r.authors, labels):
            stats.tokens_by_author[a] = stats.tokens_by_author.get(a, 0) + 1
            if label != IGNORE:
                stats.supervised_by_author[a] = stats.supervised_by_author.get(a, 0) + 1
        yield r, labels


def encode_rows(
    streams: Iterable[Stream],
    renderer: Renderer,
    view: str | Iterable[str],
    *,
    max_length: int | None = None,
    truncation_side: str = "left",
) -> tuple[list[dict[str, Any]], RenderStats]:
    """Render streams into training rows `{"id", "input_ids", "labels"}` for a view
    (`render_rows`: rows with no supervised token are dropped and counted)."""
    stats = RenderStats()
    rows = [
        {"id": r.id, "input_ids": r.input_ids, "labels": labels}
        for r, labels in render_rows(
            streams, renderer, view, max_length=max_length, truncation_side=truncation_side, stats=stats
        )
    ]
    return rows, stats
