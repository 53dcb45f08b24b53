"""Distillation: notes from stored streams, spending extra compute so a later prompt needs less.

In data-flow order:

1. **Cases** (`cases`): what the world said that is worth keeping, each a span of one
   world-authored segment (`store.EVIDENCE_AUTHORS`): a `correction` (the world's answer right
   after an agent turn: a user's objection, a verdict, an oracle's solution), a `tool` result, or a
   `policy` line (a line of any other world segment that states a rule: "only", "must", "never",
   ...; a question, "Do I qualify?", states none). The agent turn a case answers (and the question before it) is its *situation*, never its
   evidence.
2. **Clusters** (`cluster`): similar cases (Jaccard overlap of their words, situations included),
   greedily, in stream order: the cases a rule could cover.
3. **Candidates**: every case's text is an `extractive` candidate (the world's own words; the
   same words in several streams are one candidate with several evidence spans). A cluster of
   cases from at least `min_cases` streams also gets `k` `abstractive` candidates from a `Writer`
   (`writer.py`), written from half its streams' cases; the other half is held out.
4. **Admission** (`admit.py`): a candidate is tested on the cluster's streams it was not written
   from (covered) and on `max_others` streams outside the cluster, with the notes the cluster has
   already admitted in context in both renderings: it must add to them (the rule first, then the
   cases it does not already cover). An admitted one is stored with its measured deltas (of a
   cluster's abstractive candidates, the best admitted one). A text already in memory is not
   tested again: the new spans are cited as more evidence.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dostream.config import opt
from dostream.memory.admit import Admission, Scorer
from dostream.memory.retrieve import STOPWORDS
from dostream.memory.store import EVIDENCE_AUTHORS, Cite, Memory
from dostream.memory.writer import Writer
from dostream.stream import Stream

# A line that states a rule: what a policy line in a user, teacher or environment segment looks like.
POLICY = re.compile(
    r"\b(only|must|never|always|not allowed|required?|requires|policy|rule|qualif\w*|eligible|cannot|"
    r"should|forbidden|prohibited)\b",
    re.I,
)


CITED = "already in memory: cited"  # a candidate's record when its text is a note already


@dataclass
class DistillConfig(Admission):
    """How notes are distilled (the admission test's thresholds are the block below)."""

    k: int = opt(4, "abstractive candidates a writer samples per cluster of cases", min=1)
    min_cases: int = opt(3, "streams a cluster needs before a writer is asked for a rule over it", min=2)
    similarity: float = opt(0.2, "word overlap (Jaccard) for a case to join a cluster", gt=0, max=1)
    max_chars: int = opt(400, "a case longer than this is cut to its first characters", min=16)
    extractive: bool = opt(True, "test every case's own words as a note")


@dataclass
class Case:
    """A world statement worth keeping: `segment` of `stream`, characters [start, end)."""

    stream: Stream
    segment: int
    start: int
    end: int
    kind: str  # correction | tool | policy
    situation: tuple[int, ...]  # the segments it is about: the agent turn it answers, the question before

    @property
    def text(self) -> str:
        return self.stream.segments[self.segment].text[self.start : self.end]

    def cite(self, written_from: bool = True) -> Cite:
        return Cite(self.stream, self.segment, (self.start, self.end), written_from)

    def situations(self) -> list[Cite]:
        return [Cite(self.stream, i, None, False) for i in self.situation if self.stream.segments[i].text.strip()]


def _trimmed(text: str, start: int, end: int, max_chars: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, min(end, start + max_chars)


def cases(stream: Stream, max_chars: int = 400, authors: frozenset[str] = EVIDENCE_AUTHORS) -> list[Case]:
    """The world statements of one stream worth keeping (see the module docstring)."""
    out: list[Case] = []
    segs = stream.segments
    for i, seg in enumerate(segs):
        if seg.author not in authors or not seg.text.strip():
            continue
        before = [j for j in range(i) if segs[j].author != "protocol"]
        agent = next((j for j in reversed(before) if segs[j].author == "agent"), None)
        answers_agent = bool(before) and segs[before[-1]].author == "agent"
        if seg.author == "tool" or answers_agent:
            asked = [j for j in before if j < agent and segs[j].author in authors] if agent is not None else []
            situation = tuple(x for x in (asked[-1] if asked else None, agent) if x is not None)
            start, end = _trimmed(seg.text, 0, len(seg.text), max_chars)
            out.append(Case(stream, i, start, end, "tool" if seg.author == "tool" else "correction", situation))
            continue
        pos = 0
        for line in seg.text.splitlines(keepends=True):
            if POLICY.search(line) and not line.rstrip().endswith("?"):  # a question states no rule
                start, end = _trimmed(seg.text, pos, pos + len(line), max_chars)
                if end > start:
                    out.append(Case(stream, i, start, end, "policy", ()))
            pos += len(line)
    return out


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if len(w) > 2 and w not in STOPWORDS}


def cluster(found: Sequence[Case], similarity: float) -> list[list[Case]]:
    """Greedy leader clustering in stream order: a case joins the first cluster whose first case's
    words (its situation's included) overlap its own by at least `similarity` (Jaccard)."""
    leaders: list[set[str]] = []
    clusters: list[list[Case]] = []
    for case in found:
        w = words(case.text + " " + " ".join(case.stream.segments[i].text for i in case.situation))
        best = next((k for k, lw in enumerate(leaders) if w and len(w & lw) / len(w | lw) >= similarity), None)
        if best is None:
            leaders.append(w)
            clusters.append([case])
        else:
            clusters[best].append(case)
    return clusters


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def distill(
    streams: Sequence[Stream],
    memory: Memory,
    model,
    renderer,
    config: DistillConfig | None = None,
    *,
    writer: Writer | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Distil `streams` into `memory`. Returns one record per candidate tested or cited: its text,
    kind, cluster, `note` (the id stored or cited, None if refused) and the admission record."""
    from tqdm.auto import tqdm

    config = config or DistillConfig()
    seen: dict[str, str] = {}
    for s in streams:
        if s.id in seen:
            raise ValueError(f"stream id {s.id!r} appears twice ({seen[s.id]} and {s.source or 'another stream'})")
        seen[s.id] = s.source or s.id
    scorer = Scorer(model, renderer, config)
    clusters = cluster(
        [c for s in streams for c in cases(s, config.max_chars, memory.evidence_authors)], config.similarity
    )
    records: list[dict[str, Any]] = []
    bar = tqdm(clusters, desc="distill clusters", unit="cluster", disable=not progress, file=sys.stderr)
    for n, group in enumerate(bar):
        ids = list(dict.fromkeys(c.stream.id for c in group))
        others = [s for s in streams if s.id not in set(ids)]
        given: list[str] = []  # the notes admitted for this cluster so far: a new one must add to them
        if writer is not None and len(ids) >= config.min_cases:
            records += _abstractive(group, ids, others, memory, scorer, writer, config.k, n, given)
        if config.extractive:
            records += _extractive(group, others, memory, scorer, n, given)
        bar.set_postfix(admitted=sum(r["admitted"] for r in records))
    return records


def _extractive(
    group: list[Case], others: list[Stream], memory: Memory, scorer: Scorer, n: int, given: list[str]
) -> list[dict]:
    by_text: dict[str, list[Case]] = {}
    for c in group:
        by_text.setdefault(_norm(c.text), []).append(c)
    out = []
    for same in by_text.values():
        first, text = same[0], same[0].text
        evidence = [first.cite(True)] + [c.cite(False) for c in same[1:]]
        situation = [x for c in same for x in c.situations()]
        record: dict[str, Any] = {"text": text, "kind": "extractive", "case": first.kind, "cluster": n}
        known = memory.find(text)
        if known is not None:
            memory.cite(known, [c.cite(False) for c in same])
            given.append(text)
            out.append({**record, "note": known, "admitted": True, "admission": {"reason": CITED}})
            continue
        covered = list({c.stream.id: c.stream for c in group if c.stream.id != first.stream.id}.values())
        test = scorer.test(text, covered, others, given)
        nid = None
        if test["admitted"]:
            given.append(text)
            nid = memory.add(
                text,
                "extractive",
                evidence=evidence,
                situation=situation,
                admission=test,
                meta={"case": first.kind, "cluster": n},
            )
        out.append({**record, "note": nid, "admitted": test["admitted"], "admission": test})
    return out


def _abstractive(group, ids, others, memory, scorer, writer: Writer, k: int, n: int, given: list[str]) -> list[dict]:
    shown = set(ids[0::2])  # the writer sees half the cluster's streams; the other half is held out
    seen_cases = [c for c in group if c.stream.id in shown]
    covered = list({c.stream.id: c.stream for c in group if c.stream.id not in shown}.values())
    texts = list(dict.fromkeys(c.text for c in seen_cases))
    out, best = [], None
    for text in dict.fromkeys(t for t in writer.write(texts, k) if t and memory.find(t) is None):
        test = scorer.test(text, covered, others, given)
        out.append(
            {
                "text": text,
                "kind": "abstractive",
                "case": "rule",
                "cluster": n,
                "note": None,
                "admitted": test["admitted"],
                "admission": test,
            }
        )
        if test["admitted"] and (best is None or test["covered"]["delta"] > best["admission"]["covered"]["delta"]):
            best = out[-1]
    for r in out:
        if r["admitted"] and r is not best:
            r["admission"]["reason"] += "; another candidate of the cluster rose more: not stored"
    if best is not None:
        given.append(best["text"])
        evidence = [c.cite(True) for c in seen_cases] + [c.cite(False) for c in group if c.stream.id not in shown]
        best["note"] = memory.add(
            best["text"],
            "abstractive",
            evidence=evidence,
            situation=[x for c in group for x in c.situations()],
            admission=best["admission"],
            meta={"cluster": n, "cases": len(group), "candidates": len(out)},
        )
    return out
