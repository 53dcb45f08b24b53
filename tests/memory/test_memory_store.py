"""The memory store: only the world's words are evidence, tombstones keep history, forget leaves
nothing from its source, and a read-only open changes nothing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memory_helpers import RULE, discount_stream

from dostream.memory.store import EVIDENCE_AUTHORS, Cite, EvidenceError, Memory, Source
from dostream.stream import _WORLD, AUTHORS, Segment, Stream


def test_evidence_authors_are_the_worlds_less_scaffolding():
    assert EVIDENCE_AUTHORS == _WORLD - {"protocol"}
    assert "agent" not in EVIDENCE_AUTHORS and "context" not in EVIDENCE_AUTHORS


@pytest.mark.parametrize("author", ["agent", "context", "protocol"])
def test_a_segment_not_written_by_the_world_cannot_be_evidence(author):
    mem = Memory(":memory:")
    s = Stream("conv-7", [Segment("user", "Hi"), Segment(author, "The discount is for everyone.")])
    with pytest.raises(EvidenceError, match=rf"stream 'conv-7', segment 1: author '{author}' cannot be evidence"):
        mem.add("The discount is for everyone.", "extractive", evidence=[Cite(s, 1)])
    # nothing half-written: a bad citation beside a good one stores neither
    with pytest.raises(EvidenceError):
        mem.add("x", "extractive", evidence=[Cite(s, 0), Cite(s, 1)])
    assert mem.notes(None) == []


def test_the_agents_text_can_be_the_situation():
    mem = Memory(":memory:")
    s = discount_stream(0, "teacher")
    nid = mem.add(RULE, "extractive", evidence=[Cite(s, 5)], situation=[Cite(s, 3), Cite(s, 1)])
    note = mem.note(nid)
    assert [x.author for x in note.evidence] == ["user"]
    assert [(x.author, x.kind) for x in note.situation] == [("agent", "situation"), ("user", "situation")]
    assert note.situation[0].quote == "Yes, everyone qualifies for the discount.\n"
    assert note.counters == {"supported": 1, "contradicted": 0, "used": 0, "helped": 0}


@settings(max_examples=60, deadline=None)
@given(
    authors=st.lists(st.sampled_from(AUTHORS), min_size=1, max_size=6),
    picks=st.lists(st.integers(0, 5), min_size=1, max_size=4),
)
def test_no_stored_evidence_is_ever_the_agents(authors, picks):
    """Over random streams and citations: a citation is stored iff every cited segment is the
    world's, and no stored evidence span is an agent's or the context's."""
    mem = Memory(":memory:")
    s = Stream("r", [Segment(a, f"text {i} by {a}") for i, a in enumerate(authors)])
    cites = [Cite(s, p % len(authors)) for p in picks]
    ok = all(authors[c.segment] in EVIDENCE_AUTHORS for c in cites)
    if ok:
        nid = mem.add("a note", "extractive", evidence=cites)
        assert {x.author for x in mem.note(nid).evidence} <= EVIDENCE_AUTHORS
    else:
        with pytest.raises(EvidenceError, match="cannot be evidence"):
            mem.add("a note", "extractive", evidence=cites)
    rows = mem.db.execute("SELECT author FROM links WHERE kind = 'evidence'").fetchall()
    assert all(a in EVIDENCE_AUTHORS for (a,) in rows)


def test_a_span_must_lie_inside_its_segment():
    mem = Memory(":memory:")
    s = discount_stream(0, "nurse")
    with pytest.raises(EvidenceError, match=r"span \[5, 999\) is not inside"):
        mem.add(RULE, "extractive", evidence=[Cite(s, 5, (5, 999))])
    with pytest.raises(EvidenceError, match="has no segment 9"):
        mem.add(RULE, "extractive", evidence=[Cite(s, 9)])
    nid = mem.add("only veterans", "extractive", evidence=[Cite(s, 5, (4, 17))])
    assert mem.note(nid).evidence[0].quote == "only veterans"


def test_supersede_keeps_history_and_counts_the_contradiction():
    mem = Memory(":memory:")
    old_s = Stream("a", [Segment("agent", "?"), Segment("user", "The store opens at 9.")])
    new_s = Stream("b", [Segment("agent", "9?"), Segment("oracle", "The store now opens at 10.")], {"user": "u2"})
    old = mem.add("The store opens at 9.", "extractive", evidence=[Cite(old_s, 1)])
    new = mem.add("The store now opens at 10.", "extractive", evidence=[Cite(new_s, 1)])
    mem.supersede(old, new)
    o = mem.note(old)
    assert (o.status, o.superseded_by, o.text) == ("superseded", new, "The store opens at 9.")
    assert o.counters["contradicted"] == 1 and o.evidence[0].stream == "a"
    assert [n.id for n in mem.history(old)] == [old, new]
    assert [n.id for n in mem.notes()] == [new]
    with pytest.raises(ValueError, match="is superseded, not active"):
        mem.supersede(old, new)


def test_forget_by_stream_removes_its_notes_and_counts(tmp_path):
    mem = Memory.open_dir(tmp_path)
    a, b = discount_stream(0, "pilot"), discount_stream(1, "nurse")
    only_a = mem.add("Zanzibarian gemstones are refunded.", "extractive", evidence=[Cite(a, 5)])
    # written from a, supported by b: written from the forgotten source, so it goes
    from_a = mem.add(RULE, "extractive", evidence=[Cite(a, 5), Cite(b, 5, written_from=False)])
    # written from b, supported by a: keeps b's evidence only
    from_b = mem.add("Veterans qualify.", "abstractive", evidence=[Cite(b, 5), Cite(a, 5, written_from=False)])
    mem.count(from_b, "used", Source("d0"))
    mem.count(from_b, "used", Source("d1"))
    mem.count(from_b, "helped", Source("d0"))
    gone = mem.forget(stream="d0")
    assert gone == [only_a, from_a]
    for nid in gone:
        n = mem.note(nid)
        assert (n.status, n.text, n.evidence, n.situation) == ("forgotten", "", [], [])
        assert not any(n.counters.values())
    kept = mem.note(from_b)
    assert kept.status == "active" and [x.stream for x in kept.evidence] == ["d1"]
    assert kept.counters == {"supported": 1, "contradicted": 0, "used": 1, "helped": 0}
    assert mem.db.execute("SELECT COUNT(*) FROM links WHERE stream = 'd0'").fetchone()[0] == 0
    assert mem.db.execute("SELECT COUNT(*) FROM counts WHERE stream = 'd0'").fetchone()[0] == 0
    mem.close()
    # the forgotten words are not left in the file (secure_delete, FTS5 merged, WAL checkpointed)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"Zanzibarian" not in raw and b"zanzibarian" not in raw


def test_forget_takes_the_sources_stream_ids_out_of_kept_notes_admission_records(tmp_path):
    """A kept note's admission record lists the streams it was tested on; forgetting a stream (or
    a user, by the streams of their links) takes those ids and their per-stream figures out of it,
    parts `ID#...` included, and leaves them nowhere in the file."""
    import json

    mem = Memory.open_dir(tmp_path)
    a, b = discount_stream(0, "pilot", user="quillon"), discount_stream(1, "nurse")
    admission = {
        "covered": {"delta": 0.3, "n": 2, "streams": ["d0#0.0", "d1"], "per_stream": [0.4, 0.2]},
        "others": {"delta": 0.0, "n": 1, "streams": ["d0"], "per_stream": [0.0]},
    }
    mem.add("Zanzibar", "extractive", evidence=[Cite(a, 5)])  # a's own note, forgotten with it
    kept = mem.add(RULE, "extractive", evidence=[Cite(b, 5)], admission=admission)
    mem.forget(user="quillon")
    record = json.loads(mem.db.execute("SELECT admission FROM notes WHERE id = ?", (kept,)).fetchone()[0])
    assert record["covered"]["streams"] == ["d1"] and record["covered"]["per_stream"] == [0.2]
    assert record["others"]["streams"] == [] and record["others"]["per_stream"] == []
    assert mem.note(kept).status == "active"
    mem.close()
    assert b'"d0' not in b"".join(p.read_bytes() for p in tmp_path.iterdir())


def test_forget_by_user_and_by_key():
    mem = Memory(":memory:")
    a = discount_stream(0, "pilot", user="alice")
    b = Stream("k", [Segment("agent", "?"), Segment("tool", "price: 12 EUR")], {"api_key": "key-1"})
    na = mem.add(RULE, "extractive", evidence=[Cite(a, 5)])
    nb = mem.add("price: 12 EUR", "extractive", evidence=[Cite(b, 1)])
    mem.count(nb, "used", Source(None, "alice", None))
    assert mem.forget(user="alice") == [na]
    assert mem.note(nb).counters["used"] == 0 and mem.note(nb).status == "active"
    assert mem.forget(key="key-1") == [nb]
    with pytest.raises(ValueError, match="exactly one source"):
        mem.forget(stream="x", user="y")


def test_read_only_open_changes_nothing(tmp_path):
    mem = Memory.open_dir(tmp_path)
    s = discount_stream(0, "pilot")
    nid = mem.add(RULE, "extractive", evidence=[Cite(s, 5)])
    mem.close()
    before = (tmp_path / "memory.sqlite").read_bytes()
    ro = Memory.open_dir(tmp_path, read_only=True)
    assert [n.id for n in ro.notes()] == [nid]
    with pytest.raises(PermissionError, match="read-only"):
        ro.count(nid, "used")
    ro.close()
    assert (tmp_path / "memory.sqlite").read_bytes() == before  # (SQLite may add its -shm beside it)


def test_cite_adds_evidence_once():
    mem = Memory(":memory:")
    a, b = discount_stream(0, "pilot"), discount_stream(1, "nurse")
    nid = mem.add(RULE, "extractive", evidence=[Cite(a, 5)])
    mem.cite(nid, [Cite(b, 5, written_from=False), Cite(a, 5)])
    mem.cite(nid, [Cite(b, 5, written_from=False)])
    assert [x.stream for x in mem.note(nid).evidence] == ["d0", "d1"]
    assert mem.note(nid).counters["supported"] == 2


def test_the_memory_modules_examples_run():
    import doctest
    import importlib

    for name in ("store", "retrieve", "admit", "writer", "consolidate"):
        module = importlib.import_module(f"dostream.memory.{name}")
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
