"""Consolidation: the learning cycle's source of a memory. Its streams are the world's cited words
(the agent's turn kept, masked), never the note writer's; its checks ask with the memory removed;
one update through `update_once` is gated and recorded in the memory's own file."""

from __future__ import annotations

from memory_helpers import RULE, discount_stream

from dostream.learning.config import UpdateConfig
from dostream.memory.consolidate import MemorySource, consolidate, evidence_streams
from dostream.memory.store import Cite, Memory
from dostream.render import Renderer

STREAMS = [discount_stream(i, w) for i, w in enumerate(["teacher", "nurse", "pilot"])]


def _memory(tmp_path):
    mem = Memory.open_dir(tmp_path)
    written = [Cite(s, 5) for s in STREAMS[:2]]
    held = [Cite(STREAMS[2], 5, written_from=False)]
    situation = [Cite(s, i) for s in STREAMS for i in (1, 3)]
    rule = mem.add("Veterans and physicians only.", "abstractive", evidence=written + held, situation=situation)
    return mem, rule


def test_the_streams_are_the_worlds_words_with_the_agents_turn_masked(tmp_path, tok):
    mem, rule = _memory(tmp_path)
    streams = evidence_streams(mem)
    assert [s.id for s in streams] == [f"memory-{rule}:d{i}" for i in range(3)]
    for s in streams:
        assert [x.author for x in s.segments] == ["user", "agent", "user"]
        assert s.segments[-1].text == RULE and "Veterans and physicians only." not in s.text
        r = Renderer(tok).render(s)
        sup = r.supervised("interventional")
        assert any(sup) and not any(sup[i] for i, a in enumerate(r.authors) if a == "agent")


def test_one_consolidation_is_a_gated_update_recorded_in_the_memory(tmp_path, tok):
    mem, rule = _memory(tmp_path)
    source = MemorySource(mem, tmp_path, "tiny", tok)
    checks, ids, control = source.checks({"notes": rule})
    assert ids == [f"note-{rule}"] and control == 0
    assert checks[0].expected == "No: only veterans and" and [x.author for x in checks[0].segments] == ["user", "agent"]
    cfg = UpdateConfig(epochs=1, batch_size=4, lora_r=2, gate_tolerance=1.0, max_length=64)
    done = consolidate(source, cfg)
    assert done.version == 1 and done.candidate is not None and (tmp_path / done.candidate).is_dir()
    [row] = source.lineage.versions.rows()
    assert row["seen"] == {"notes": rule} and row["gate"]["n"] == 1
    assert done.accepted == (row["current"] == done.candidate)
    assert consolidate(source, cfg) is None  # nothing new since
