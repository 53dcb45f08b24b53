"""Admission, the world-model test: a note earns its place only if it makes the world more predictable.

With the note rendered as a `context` segment before a stored stream (`retrieve.as_context`, the
way it would enter a prompt), the model scores the stream's world tokens (those the
`interventional` view supervises: what the rule says is evidence) through `dostream.scoring`, and
again with the same context segment without it (what is measured is the note's words, not the
header's; with the notes already admitted for the same cases in both, so that a note that only
repeats one already there gains nothing). Every segment is tokenised on its own (`render/`), so the stream's tokens are
the same ids in both renderings and the two scores are paired token by token. Δ is the mean
per-token change in log-likelihood, in nats, pooled over a set of streams:

* `covered`: the streams the note claims to cover (similar cases) that it was NOT distilled from.
  Δ must be above `min_gain` (it must rise). No such stream: nothing to test it on, refused.
* `others`: stored streams it does not claim to cover. Δ must not fall below `-tolerance`.

The same keep-or-restore logic as an adapter's gate (`learning/gate.py`), on likelihoods instead of
successes. The measured numbers are returned as the record stored with the note.

>>> Admission(min_gain=0.1, tolerance=0.15).judge({"delta": 0.2, "n": 3}, {"delta": -0.01, "n": 4})
(True, 'covered Δ +0.2000, others Δ -0.0100 nats/token')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dostream.config import opt
from dostream.render import Renderer
from dostream.stream import Segment, Stream

VIEW = "interventional"  # the world's tokens: what the causal rule supervises


def _scored(renderer: Renderer, stream: Stream, prefix: Segment | None) -> tuple[list[int], list[bool]]:
    """The ids to score and which of them: the stream's world tokens (`VIEW`), the same tokens with
    or without `prefix`. A prefix changes only the front (a chat template's default system prompt
    gives way to it), so the stream's tokens are matched from the end; the stream's first token,
    which nothing precedes without a prefix, is scored in neither."""
    bare = renderer.render(stream)
    keep = bare.supervised(VIEW)
    if prefix is None:
        return bare.input_ids, keep
    r = renderer.render(Stream(stream.id, [prefix, *stream.segments], stream.meta))
    d = len(r) - len(bare)  # may be negative: a short note in place of a long default system prompt
    mask = [i >= 1 and 0 <= i - d and keep[i - d] for i in range(len(r))]
    if any(r.input_ids[i] != bare.input_ids[i - d] for i in range(len(r)) if mask[i]):
        raise ValueError(f"stream {stream.id!r}: a context note before it changed its own tokens")
    return r.input_ids, mask


def world_logprobs(
    model, renderer: Renderer, streams: Sequence[Stream], prefix: Segment | None = None, *, batch_size: int = 8
) -> list[list[float]]:
    """Per stream, log p of each of its world tokens (`VIEW`), with `prefix` (a `context` segment)
    before it or without: the same tokens either way, in the same order."""
    import torch

    from dostream.scoring import logprobs_at

    device = next(model.parameters()).device
    rows = [_scored(renderer, s, prefix) for s in streams]
    pad = renderer.tok.pad_token_id if renderer.tok.pad_token_id is not None else 0
    out: list[list[float]] = []
    with torch.inference_mode():
        for k in range(0, len(rows), batch_size):
            chunk = rows[k : k + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            score = torch.zeros((len(chunk), width), dtype=torch.bool)
            for b, (x, sup) in enumerate(chunk):
                ids[b, : len(x)] = torch.tensor(x)
                mask[b, : len(x)] = 1
                score[b, : len(x)] = torch.tensor(sup)
            logp = logprobs_at(model, ids.to(device), mask.to(device), score.to(device)).float().cpu()
            out += [part.tolist() for part in logp.split([sum(sup[1:]) for _, sup in chunk])]
    return out


def delta(with_note: list[list[float]], without: list[list[float]]) -> dict[str, Any]:
    """Pooled per-token Δ log p (nats) over streams, with each stream's own Δ and the token count."""
    per, total, n = [], 0.0, 0
    for a, b in zip(with_note, without, strict=True):
        assert len(a) == len(b), "a context prefix changed the stream's own tokens"
        diff = sum(a) - sum(b)
        per.append(diff / len(a) if a else 0.0)
        total, n = total + diff, n + len(a)
    return {"delta": total / n if n else 0.0, "n": len(per), "tokens": n, "per_stream": per}


@dataclass
class Admission:
    """Admission: the world-model test's thresholds

    A note is admitted iff its covered held-out streams' world tokens rise by more than `min_gain`
    nats per token and the other streams' fall by no more than `tolerance`."""

    # SmolLM2-135M-Instruct on the discount streams (docs/memory.md): a note of the world's words
    # raised the held-out world tokens 0.7-1.4 nats/token, an unrelated note moved them -0.04 to
    # +0.04; any one-line note moved short unrelated streams -0.12 to +0.09.
    min_gain: float = opt(0.1, "per-token nats the covered held-out world tokens must rise by (strictly more)")
    tolerance: float = opt(0.15, "per-token nats the other streams' world tokens may fall by at most", min=0)
    max_covered: int = opt(
        16, "held-out streams of the note's cluster the test scores (the first, in stream order)", min=1
    )
    max_others: int = opt(8, "other stored streams the test scores (the first, in stream order)", min=0)

    def judge(self, covered: dict[str, Any], others: dict[str, Any]) -> tuple[bool, str]:
        """(admitted, why) from measured Δs (`delta`'s records)."""
        if not covered["n"]:
            return False, "no held-out stream it covers: nothing to test it on"
        if covered["delta"] <= self.min_gain:
            return False, f"covered world tokens Δ {covered['delta']:+.4f} nats/token, not above {self.min_gain}"
        if others["n"] and others["delta"] < -self.tolerance:
            return (
                False,
                f"other streams' world tokens fell {others['delta']:+.4f} nats/token (tolerance {self.tolerance})",
            )
        return True, f"covered Δ {covered['delta']:+.4f}, others Δ {others['delta']:+.4f} nats/token"


def _context(texts: Sequence[str]) -> Segment:
    """The `context` segment a prompt would hold with these notes (`retrieve.as_context`); none:
    its header alone."""
    from dostream.memory.retrieve import CONTEXT_HEADER, as_context
    from dostream.memory.store import Note

    if not texts:
        return Segment("context", CONTEXT_HEADER, meta={"memory_notes": []})
    return as_context([Note(0, t, "extractive", "active", None, 0.0, None, {}) for t in texts])


class Scorer:
    """The test for many notes over one set of stored streams. A note is measured against what
    memory already holds for its cases (`given`: notes already admitted, in context in both
    renderings), so a note that only repeats one already there gains nothing and is refused. The
    scores without the note are kept per `given` and stream."""

    def __init__(self, model, renderer: Renderer, admission: Admission, *, batch_size: int = 8):
        self.model, self.renderer, self.admission, self.batch_size = model, renderer, admission, batch_size
        self._base: dict[tuple[tuple[str, ...], str], list[float]] = {}

    def _without(self, given: tuple[str, ...], streams: Sequence[Stream]) -> list[list[float]]:
        todo = [s for s in streams if (given, s.id) not in self._base]
        scored = world_logprobs(self.model, self.renderer, todo, _context(given), batch_size=self.batch_size)
        for s, lp in zip(todo, scored):
            self._base[given, s.id] = lp
        return [self._base[given, s.id] for s in streams]

    def measure(self, text: str, streams: Sequence[Stream], given: Sequence[str] = ()) -> dict[str, Any]:
        """Δ of `streams`' world tokens with the note `text` added to the `given` notes in context
        (`delta`'s record)."""
        if not streams:
            return delta([], [])
        given = tuple(given)
        with_note = world_logprobs(
            self.model, self.renderer, streams, _context([*given, text]), batch_size=self.batch_size
        )
        return delta(with_note, self._without(given, streams))

    def test(
        self, text: str, covered: Sequence[Stream], others: Sequence[Stream], given: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The admission record: both Δs, the thresholds, the verdict and why."""
        covered, others = list(covered)[: self.admission.max_covered], list(others)[: self.admission.max_others]
        c, o = self.measure(text, covered, given), self.measure(text, others, given)
        admitted, reason = self.admission.judge(c, o)
        return {
            "admitted": admitted,
            "reason": reason,
            "covered": {**c, "streams": [s.id for s in covered]},
            "others": {**o, "streams": [s.id for s in others]},
            "given": len(given),
            "min_gain": self.admission.min_gain,
            "tolerance": self.admission.tolerance,
            "view": VIEW,
        }
