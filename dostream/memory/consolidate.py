"""Consolidation ("sleep"): what the memory holds, moved into the adapter by the one learning cycle.

`MemorySource` is a source of `learning.cycle.update_once`, like the agent's episodes and the
server's conversations; nothing here trains or gates on its own.

* **Streams: the notes' cited world segments** (`evidence_streams`). For each note and each
  stream it cites, the cited spans of that stream in their order, each with its own author: the
  question and the world's answer supervised under `interventional`, the agent's turn (a
  situation) kept in context as `agent`, masked. The note's own text is never in them: the weights
  learn the world's words, not the note writer's.
* **Checks: what survives with the memory removed.** For each note consolidated so far, its first
  evidence stream up to the evidence span is the prompt, with no memory in context; the check
  passes if the greedy continuation starts with the first `check_words` words of the world's
  words. The gate (`learning/gate.py`) keeps a candidate that answers them about as well as the
  adapter in force.
* **Versions** in the memory's own file (`learning/versions.py`'s table), adapters under
  `DIR/adapters/update-NNNNNN/`; `seen` is `{"notes": the newest note id consolidated}`.

>>> from dostream.memory.store import Cite, Memory
>>> mem = Memory(":memory:")
>>> s = Stream("s", [Segment("user", "Discount?"), Segment("agent", "Yes."), Segment("user", "No, veterans only.")])
>>> nid = mem.add("Veterans only.", "extractive", evidence=[Cite(s, 2)], situation=[Cite(s, 1), Cite(s, 0)])
>>> [(x.author, x.text) for x in evidence_streams(mem)[0].segments]
[('user', 'Discount?'), ('agent', 'Yes.'), ('user', 'No, veterans only.')]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dostream.learning.cycle import Batch, Lineage, Recorded, replay_sample, update_once
from dostream.learning.versions import VERSIONS_SCHEMA, Versions
from dostream.memory.store import Link, Memory, Note
from dostream.stream import Segment, Stream


def _spans(note: Note) -> dict[str, list[Link]]:
    """A note's links by stream, in the streams' order of first evidence, each in segment order."""
    by: dict[str, list[Link]] = {x.stream: [] for x in note.evidence}
    for x in note.evidence + note.situation:
        if x.stream in by:
            by[x.stream].append(x)
    return {sid: sorted(xs, key=lambda x: (x.segment, x.start)) for sid, xs in by.items()}


def evidence_streams(memory: Memory, notes: Sequence[Note] | None = None) -> list[Stream]:
    """One stream per (note, cited stream): the cited spans, in order, with their own authors."""
    out = []
    for note in memory.notes() if notes is None else notes:
        for sid, links in _spans(note).items():
            segments = [Segment(x.author, x.quote) for x in links]
            out.append(Stream(f"memory-{note.id}:{sid}", segments, {"memory_note": note.id, "stream": sid}))
    return out


@dataclass
class Check:
    """A note's check: the prompt (its first evidence stream up to the evidence) and the words
    the world said next."""

    id: str
    segments: list[Segment]
    expected: str

    def passes(self, text: str) -> bool:
        return " ".join(text.split()).lower().startswith(self.expected.lower())


class MemorySource:
    """The learning cycle's source of a memory in directory `root` (`root/memory.sqlite`)."""

    # a consolidation killed mid-way continues its directory when the notes it was for are the same
    # (the cycle checks the batch's `seen`): the redo ends with the same weights; else it starts again
    fresh = False

    def __init__(
        self, memory: Memory, root: str | Path, model: str, tok, *, start=None, check_words: int = 4, load=None
    ):
        memory.db.executescript(VERSIONS_SCHEMA)
        self.memory, self.model_name, self.tok, self.check_words = memory, model, tok, check_words
        # `start`: the adapter version 0 is (None: the base model)
        self.lineage = Lineage(Path(root), Versions(memory.db), None if start is None else Path(start))
        self._load = load  # adapter path (None: the base) -> model; default: models.load_model, merged
        self._models: dict[str | None, Any] = {}

    @property
    def turn_budget(self) -> int:
        return 0  # no sampled turns: the reward learners do not apply

    def batch(self, replay: float = 1.0, seed: int = 0) -> Batch | None:
        """The notes added since the last consolidation (and replayed older ones' streams), or None."""
        upto = self.lineage.versions.seen_max("notes")
        notes = self.memory.notes()
        new = [n for n in notes if n.id > upto]
        if not new:
            return None
        step = self.lineage.versions.next_version()
        old = replay_sample([n for n in notes if n.id <= upto], len(new), replay, f"memory-replay:{seed}:{step}")
        streams, replayed = evidence_streams(self.memory, new), evidence_streams(self.memory, old)
        metrics = {"notes/new": len(new), "notes/replayed": len(old), "streams/new": len(streams)}
        return Batch(step, {"notes": max(n.id for n in new)}, streams, replayed, 1, metrics)

    def checks(self, seen: dict[str, int]) -> tuple[list[Check], list[str], int]:
        out = []
        for note in self.memory.notes():
            if note.id > seen["notes"]:
                continue
            links = next(iter(_spans(note).values()))
            k = next(i for i, x in enumerate(links) if x.kind == "evidence")
            words = re.findall(r"\S+", links[k].quote)[: self.check_words]
            if k and words:  # a check needs something to prompt with and words to expect
                segments = [Segment(x.author, x.quote) for x in links[:k]]
                out.append(Check(f"note-{note.id}", segments, " ".join(words)))
        return out, [c.id for c in out], 0

    def ask(self, adapter: str | None, checks: list[Check]) -> list[bool]:
        from dostream.render import Renderer, decode
        from dostream.sampling import SamplingConfig, sample

        if adapter not in self._models:
            path = self.lineage.path_of(adapter)
            if self._load is not None:
                self._models[adapter] = self._load(path)
            else:
                from dostream.models import load_model

                self._models[adapter] = load_model(self.model_name, adapter=path, merge=True)
        renderer = Renderer(self.tok)
        prompts = [renderer.prompt_ids(Stream(c.id, c.segments)) for c in checks]
        budget = 4 * self.check_words + 8
        out = sample(self._models[adapter], self.tok, prompts, SamplingConfig(greedy=True, max_new_tokens=budget))
        return [c.passes(decode(self.tok, s.token_ids)) for c, s in zip(checks, out)]


def consolidate(source: MemorySource, cfg) -> Recorded | None:
    """One consolidation: `update_once` on the notes new since the last one (None: nothing new).
    `cfg` is a `learning.config.UpdateConfig` (its learner `interventional`: the world's words)."""
    batch = source.batch(cfg.replay, cfg.seed)
    if batch is None:
        return None
    return update_once(cfg, source.model_name, source.tok, source, batch, source.lineage)
