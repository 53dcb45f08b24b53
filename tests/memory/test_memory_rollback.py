"""A memory put back to a version (`memory/rollback.py`): later notes leave retrieval and every
reader of active notes, a note their correction superseded is active again, nothing forgotten comes
back, a roll forward brings the rolled-back notes and their supersessions back, and a history that
branched is refused rather than guessed."""

from __future__ import annotations

import time

import pytest

from dostream.memory.consolidate import evidence_streams
from dostream.memory.retrieve import Lexical, retrieve
from dostream.memory.rollback import UNSUPERSEDED_SCHEMA, RollbackError, roll_back, version_of
from dostream.memory.store import Cite, Memory, Source
from dostream.memory.tools import propose, tools
from dostream.stream import Segment, Stream


def _said(mem: Memory, text: str, sid: str, user: str | None = None) -> int:
    s = Stream(sid, [Segment("user", text)], {"user": user} if user else {})
    return mem.add(text, "extractive", evidence=[Cite(s, 0)])


def _ids(mem: Memory, query: str, **kw) -> list[int]:
    return sorted(n.id for n in retrieve(mem, query, 10, **kw))


@pytest.fixture
def mem():
    m = Memory(":memory:")
    yield m
    m.close()


def test_notes_added_after_the_version_leave_retrieval_and_every_active_reader(mem):
    a = _said(mem, "The harbour vault opens with code 7731.", "s1")
    b = _said(mem, "The harbour gate shuts at nine.", "s2")
    c = _said(mem, "The harbour vault alarm is silent.", "s3")
    assert version_of(mem.db) == c and _ids(mem, "harbour vault gate") == [a, b, c]
    done = roll_back(mem, a)
    assert (done.rolled_back, done.restored) == ([b, c], [])
    assert version_of(mem.db) == a
    for retriever in (None, Lexical(mem)):  # bm25s rebuilt (its stamp changed) and FTS5 alike
        assert _ids(mem, "harbour vault gate nine alarm", retriever=retriever) == [a]
    assert [n.id for n in mem.notes()] == [a] and mem.find("The harbour gate shuts at nine.") is None
    assert [n.status for n in mem.notes(None)] == ["active", "rolled_back", "rolled_back"]
    assert mem.note(b).text == "The harbour gate shuts at nine."  # out, not erased
    assert [s.meta["memory_note"] for s in evidence_streams(mem)] == [a]  # what consolidation trains on
    with pytest.raises(ValueError, match="rolled_back, not active"):
        mem.cite(b, [Cite(Stream("s9", [Segment("user", "Again.")]), 0)])


def _callable(mem: Memory) -> list[int]:
    return [t.id for t in tools(mem) if t.callable]


def test_a_rolled_back_tool_is_not_callable(mem):
    ep = Stream("ep", [Segment("user", "Add 2 and 3."), Segment("environment", "5")])
    version = _said(mem, "Sums are asked for.", "s0")
    tid = propose(mem, "arith", "add", {"op": "add"}, "Adds two numbers.", evidence=[Cite(ep, 1)])
    mem.db.execute("UPDATE tools SET status = 'verified' WHERE note = ?", (tid,))
    assert _callable(mem) == [tid]
    roll_back(mem, version)
    assert _callable(mem) == [] and _ids(mem, "Adds two numbers") == []
    roll_back(mem, tid)  # forward again: callable again, and still never retrieved as a note
    assert _callable(mem) == [tid] and _ids(mem, "Adds two numbers") == []


def test_a_note_superseded_after_the_version_is_active_again_and_forward_supersedes_it_again(mem):
    old = _said(mem, "The harbour vault opens with code 7731.", "s1")
    new = _said(mem, "The harbour vault opens with code 9000 now.", "s2")
    mem.supersede(old, new)
    assert _ids(mem, "harbour vault code") == [new]
    done = roll_back(mem, old)
    assert (done.rolled_back, done.reactivated) == ([new], [old])
    assert _ids(mem, "harbour vault code") == [old]
    note = mem.note(old)
    assert (note.status, note.superseded_by) == ("active", None)
    assert mem.history(old) == [note]
    done = roll_back(mem, new)  # roll forward: the correction back, and its supersession with it
    assert (done.restored, done.resuperseded) == ([new], [old])
    assert (mem.note(old).status, mem.note(old).superseded_by) == ("superseded", new)
    assert _ids(mem, "harbour vault code") == [new]
    assert [n.id for n in mem.history(old)] == [old, new]


def test_supersessions_among_rolled_back_notes_come_back_with_them(mem):
    base = _said(mem, "Ships dock at pier one.", "s0")
    old = _said(mem, "The harbour vault opens with code 7731.", "s1")
    new = _said(mem, "The harbour vault opens with code 9000 now.", "s2")
    mem.supersede(old, new)
    roll_back(mem, base)
    assert [n.status for n in mem.notes(None)] == ["active", "rolled_back", "rolled_back"]
    assert mem.note(old).superseded_by == new  # kept while out
    roll_back(mem, new)
    assert [n.status for n in mem.notes(None)] == ["active", "superseded", "active"]
    assert _ids(mem, "harbour vault code pier") == [base, new]
    roll_back(mem, old)  # to between them: the correction out, the old note active
    assert [n.status for n in mem.notes(None)] == ["active", "active", "rolled_back"]
    assert _ids(mem, "harbour vault code pier") == [base, old]


def test_a_forgotten_note_stays_forgotten_with_no_text(mem):
    a = _said(mem, "The harbour gate shuts at nine.", "s1")
    b = _said(mem, "Mia's vault code is 4242.", "s2", user="mia")
    c = _said(mem, "Mia's locker is number 12.", "s3", user="mia")
    roll_back(mem, a)  # b and c out
    assert mem.forget(user="mia") == [b, c]  # forgetting reaches rolled-back notes too
    roll_back(mem, c)  # forward: nothing to bring back
    for n in (b, c):
        note = mem.note(n)
        assert (note.status, note.text, note.evidence, note.counters["supported"]) == ("forgotten", "", [], 0)
    assert _ids(mem, "vault code locker gate Mia") == [a]
    mem.forget(stream="s1")
    roll_back(mem, 0)
    roll_back(mem, c)
    assert (mem.note(a).status, mem.note(a).text) == ("forgotten", "")


def test_rolling_back_to_the_current_version_changes_nothing(mem):
    a = _said(mem, "The harbour gate shuts at nine.", "s1")
    b = _said(mem, "The harbour vault opens with code 7731.", "s2")
    mem.supersede(a, b)
    before = mem.db.execute("SELECT * FROM notes ORDER BY id").fetchall()
    done = roll_back(mem, b)
    assert done.to_json() == {
        "version": b, "rolled_back": [], "restored": [], "reactivated": [], "resuperseded": [], "counts_removed": 0,
    }  # fmt: skip
    assert mem.db.execute("SELECT * FROM notes ORDER BY id").fetchall() == before
    assert mem.db.execute("SELECT name FROM sqlite_master WHERE name = 'unsuperseded'").fetchone() is None


@pytest.mark.parametrize("bad", [3, -1, 1.5, "1", True, None])
def test_a_bad_version_is_an_error_naming_it(mem, bad):
    _said(mem, "The harbour gate shuts at nine.", "s1")
    _said(mem, "The harbour vault opens with code 7731.", "s2")
    with pytest.raises(ValueError, match="version: ") as e:
        roll_back(mem, bad)
    assert ("above the memory's newest note (2)" in str(e.value)) == (bad == 3)
    assert version_of(mem.db) == 2 and len(mem.notes()) == 2


def test_a_read_only_memory_refuses(tmp_path):
    mem = Memory.open_dir(tmp_path)
    _said(mem, "The harbour gate shuts at nine.", "s1")
    mem.close()
    ro = Memory.open_dir(tmp_path, read_only=True)
    with pytest.raises(PermissionError, match="read-only"):
        roll_back(ro, 0)
    ro.close()


def test_counts_made_after_the_snapshot_on_kept_notes_are_rolled_back(mem):
    a = _said(mem, "The harbour gate shuts at nine.", "s1")
    mem.count(a, "used", Source("c1"))
    snapshot = time.time()
    time.sleep(0.01)
    b = _said(mem, "The harbour vault opens with code 7731.", "s2")
    for n in (a, b):
        mem.count(n, "used", Source("c2"))
    mem.count(a, "helped", Source("c2"))
    done = roll_back(mem, a, since=snapshot)
    assert done.counts_removed == 2
    assert (mem.note(a).counters["used"], mem.note(a).counters["helped"], mem.note(a).counters["supported"]) == (
        1,
        0,
        1,
    )
    assert mem.note(b).counters["used"] == 1  # kept with the rolled-back note


def test_a_history_that_branched_is_restored_where_it_can_be_and_refused_where_not(mem):
    """Snapshots A (1), B (3); back to A; note 4 added (a branch: 2 and 3 were out when it came):
    a snapshot D here holds {1, 4}. Back to A again, then forward to D gives {1, 4}, not
    {1, 2, 3, 4}; forward to B would have to bring 2 and 3 back past 4, and is refused."""
    a = _said(mem, "The harbour gate shuts at nine.", "s1")
    _said(mem, "The harbour vault opens with code 7731.", "s2")
    b = _said(mem, "The harbour alarm is silent.", "s3")
    roll_back(mem, a)
    time.sleep(0.01)
    d = _said(mem, "The harbour pier is closed.", "s4")
    assert version_of(mem.db) == d
    assert roll_back(mem, d).to_json()["restored"] == []  # the current version: nothing changes
    roll_back(mem, a)
    done = roll_back(mem, d)
    assert (done.restored, [n.id for n in mem.notes()]) == ([d], [a, d])
    with pytest.raises(RollbackError, match=r"version: note 2 was rolled back and note 4 was added after it"):
        roll_back(mem, b)
    assert [n.id for n in mem.notes()] == [a, d]  # refused: nothing changed


def test_a_rollback_is_one_transaction(tmp_path):
    """A failure at the last statement (the correction remembered) leaves the memory as it was:
    no note out, the superseded one still superseded, the index whole."""
    mem = Memory.open_dir(tmp_path)
    a = _said(mem, "The harbour gate shuts at nine.", "s1")
    _said(mem, "The harbour vault opens with code 7731.", "s2")
    c = _said(mem, "The harbour gate shuts at ten now.", "s3")
    mem.supersede(a, c)
    mem.db.executescript(UNSUPERSEDED_SCHEMA)
    mem.db.execute("CREATE TRIGGER killed BEFORE INSERT ON unsuperseded BEGIN SELECT RAISE(ABORT, 'killed'); END")
    before = mem.db.execute("SELECT * FROM notes ORDER BY id").fetchall()
    with pytest.raises(Exception, match="killed"):
        roll_back(mem, a)
    assert mem.db.execute("SELECT * FROM notes ORDER BY id").fetchall() == before
    assert _ids(mem, "harbour gate vault") == [2, c]
    mem.db.execute("DROP TRIGGER killed")
    roll_back(mem, a)
    assert _ids(mem, "harbour gate vault") == [a]
    mem.close()
