"""A rendering once made (`Rendered`): labels under a view, truncation; knows nothing of
tokenizers, chat templates or streams."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from dostream.stream import view_authors

IGNORE = -100

# How `Rendered.truncate` shortens a row: `left` keeps the most recent tokens, `right` the first
# ones, `turns` keeps the head context (the leading `context` tokens: system prompt, tool list, the
# template's preamble) and drops whole turns after it, oldest first (then, if the newest turn alone
# is still too long, its oldest tokens); `auto` is `turns` for a rendering that has a head, else
# `left`.
TRUNCATION_SIDES: tuple[str, ...] = ("left", "right", "turns", "auto")


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
