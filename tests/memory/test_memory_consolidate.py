"""Consolidation: the learning cycle's source of a memory. Its streams are the world's cited words
(the agent's turn kept, masked), never the note writer's; its checks ask with the memory removed."""

from __future__ import annotations

from memory_helpers import RULE, discount_stream

from dostream.memory.consolidate import MemorySource, evidence_streams
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


def test_the_checks_prompt_with_the_situation_and_expect_the_worlds_words(tmp_path, tok):
    """(One update through `update_once` runs in test_memory_cli.py, `memory consolidate`.)"""
    mem, rule = _memory(tmp_path)
    source = MemorySource(mem, tmp_path, "tiny", tok)
    checks, ids, control = source.checks({"notes": rule})
    assert ids == [f"note-{rule}"] and control == 0
    assert checks[0].expected == "No: only veterans and" and [x.author for x in checks[0].segments] == ["user", "agent"]
    assert checks[0].passes("  no: ONLY veterans and physicians") and not checks[0].passes("Yes, everyone")
    assert source.checks({"notes": rule - 1})[0] == []  # a note not consolidated yet is not asked
    batch = source.batch()
    assert batch.seen == {"notes": rule} and [s.id for s in batch.new] == [f"memory-{rule}:d{i}" for i in range(3)]
