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

from dostream.stream import Stream, view_authors

IGNORE = -100

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
        matters most in a stream) or the first ones (`right`). Text and offsets are cut to match."""
        if max_length <= 0:
            raise ValueError("max_length must be positive")
        if len(self) <= max_length:
            return self
        if side not in ("left", "right"):
            raise ValueError(f"truncation side must be 'left' or 'right', got {side!r}")
        sl = slice(len(self) - max_length, None) if side == "left" else slice(0, max_length)
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
        )


@dataclass
class _Piece:
    author: str
    text: str
    token_ids: list[int] | None = None
    where: str = ""  # for error messages


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
        if self.chat_template:
            pieces = self._chat_pieces(stream, add_generation_prompt)
        else:
            pieces = [_Piece(s.author, s.text, s.token_ids, f"segment {i}") for i, s in enumerate(stream.segments)]
            if self.add_eos and not add_generation_prompt:
                pieces.append(self._eos_piece(pieces))
        return self._tokenize(stream.id, pieces)

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
            return _Piece(last.author, "", [], "eos")  # the agent already sampled its own EOS
        return _Piece(last.author, self.tok.eos_token, [eos_id], "eos")

    # -- chat template ----------------------------------------------------------------------
    def _chat_pieces(self, stream: Stream, add_generation_prompt: bool) -> list[_Piece]:
        messages: list[dict[str, Any]] = []  # {"role", "segments": [(index, Segment)]}
        for i, s in enumerate(stream.segments):
            role = s.role or AUTHOR_ROLES[s.author]
            if messages and messages[-1]["role"] == role:
                messages[-1]["segments"].append((i, s))
            else:
                messages.append({"role": role, "segments": [(i, s)]})
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
            pieces += [_Piece(s.author, s.text, s.token_ids, f"segment {i}") for i, s in m["segments"]]
            after = between[k + 1]
            owner = m["segments"][-1][1]
            # The end-of-turn marker belongs to whoever wrote the turn. An agent that sampled the
            # marker itself already owns it in its token_ids, so the template's copy is dropped.
            marker = next((t for t in self._special if after.startswith(t)), None)
            if marker is not None:
                after = after[len(marker) :]
                if not owner.text.endswith(marker):
                    pieces.append(_Piece(owner.author, marker, None, f"end of turn {k}"))
            pieces.append(_Piece("protocol", after, None, f"template after message {k}"))
        return pieces

    # -- tokenisation -----------------------------------------------------------------------
    def _tokenize(self, sid: str, pieces: list[_Piece]) -> Rendered:
        text_parts: list[str] = []
        ids: list[int] = []
        authors: list[str] = []
        offsets: list[tuple[int, int] | None] = []
        segments: list[dict[str, Any]] = []
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
            ids += p_ids
            authors += [p.author] * len(p_ids)
            offsets += [None if o is None else (o[0] + pos, o[1] + pos) for o in p_offsets]
            if p.text:
                segments.append({"author": p.author, "start": pos, "end": pos + len(p.text)})
            text_parts.append(p.text)
            pos += len(p.text)
        return Rendered(sid, "".join(text_parts), ids, authors, offsets, segments)

    def _sampled_offsets(self, sid: str, p: _Piece) -> list[tuple[int, int] | None]:
        """Character spans of sampled ids inside their own text, by incremental decoding.

        A token that decodes to part of a character (byte-level BPE splits emoji) gets `None`;
        the token that completes the character gets its span. Decoding restarts after every
        complete character, so the cost is linear in the segment length."""
        ids, text = p.token_ids, p.text
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
    """What `encode_rows` did with a collection of streams."""

    streams: int = 0
    rows: int = 0
    truncated: int = 0
    dropped_no_supervised: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    tokens_by_author: dict[str, int] = field(default_factory=dict)
    supervised_by_author: dict[str, int] = field(default_factory=dict)

    @property
    def supervised_frac(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0


def encode_rows(
    streams: Iterable[Stream],
    renderer: Renderer,
    view: str | Iterable[str],
    *,
    max_length: int | None = None,
    truncation_side: str = "left",
) -> tuple[list[dict[str, Any]], RenderStats]:
    """Render streams into training rows `{"id", "input_ids", "labels"}` for a view.

    Rows left with no supervised token (after truncation) are dropped and counted, never kept
    (invariant 4): they would cost compute and, averaged naively, distort the loss.
    """
    authors = view_authors(view)
    stats = RenderStats()
    rows = []
    for stream in streams:
        stats.streams += 1
        r = renderer.render(stream)
        if max_length is not None and len(r) > max_length:
            r = r.truncate(max_length, truncation_side)
            stats.truncated += 1
        labels = r.labels(authors)
        n_sup = sum(label != IGNORE for label in labels)
        if n_sup == 0:
            stats.dropped_no_supervised += 1
            continue
        stats.rows += 1
        stats.tokens += len(r)
        stats.supervised_tokens += n_sup
        for a, label in zip(r.authors, labels):
            stats.tokens_by_author[a] = stats.tokens_by_author.get(a, 0) + 1
            if label != IGNORE:
                stats.supervised_by_author[a] = stats.supervised_by_author.get(a, 0) + 1
        rows.append({"id": r.id, "input_ids": r.input_ids, "labels": labels})
    return rows, stats
