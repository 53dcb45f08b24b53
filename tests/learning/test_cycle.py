"""The learning cycle's parts on their own: the versions table (the adapter in force, one update per
point of a source, stores written before it), the gate's keep-or-restore rule."""

import sqlite3

import pytest

from dostream.learning.gate import Gate
from dostream.learning.versions import VERSIONS_SCHEMA, Versions
from dostream.sqlite import connect


def test_the_adapter_in_force_follows_accepted_updates_and_rollbacks(tmp_path):
    v = Versions(connect(tmp_path / "s.sqlite", VERSIONS_SCHEMA))
    assert v.in_force() == (None, 0) and v.seen_max("episodes") == -1
    assert v.add("update", "a1", True, "ok", {}, {}, {"episodes": 8}) == 1
    assert v.add("update", "a2", False, "worse", {}, {}, {"episodes": 16}) == 2
    assert v.in_force() == ("a1", 1)  # a rejected update leaves the previous adapter in force
    with pytest.raises(sqlite3.IntegrityError):
        v.add("update", "again", True, "ok", {}, {}, {"episodes": 16})  # one update per point
    v.add("rollback", None, True, "back", {}, {}, {"episodes": 16}, current=(None, 0))  # a rollback may repeat a point
    assert v.in_force() == (None, 0) and v.next_version() == 4
    assert v.seen_max("episodes") == 16 and v.has_seen("episodes", 8) and not v.has_seen("episodes", 9)
    assert [r["kind"] for r in v.rows()] == ["update", "update", "rollback"]


def test_a_store_written_before_the_versions_table_is_converted_or_read_as_it_was(tmp_path):
    from dostream.agent.store import Store

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE episodes (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, stream TEXT NOT NULL, reward REAL NOT NULL,"
        " success INTEGER NOT NULL, adapter TEXT, created REAL NOT NULL);"
        "CREATE TABLE evals (id INTEGER PRIMARY KEY, split TEXT NOT NULL, after_episodes INTEGER NOT NULL,"
        " successes INTEGER NOT NULL, n INTEGER NOT NULL, adapter TEXT, created REAL NOT NULL);"
        "CREATE TABLE updates (id INTEGER PRIMARY KEY, after_episodes INTEGER NOT NULL UNIQUE, candidate TEXT NOT NULL,"
        " accepted INTEGER NOT NULL, reason TEXT NOT NULL, current TEXT, metrics TEXT NOT NULL, created REAL NOT NULL);"
        "INSERT INTO updates VALUES (1, 8, 'a8', 1, 'ok', 'a8', '{}', 0), (2, 16, 'a16', 0, 'worse', 'a8', '{}', 0);"
    )
    db.close()
    old = Store(path, read_only=True)  # read through the conversion, nothing written
    assert old.current_adapter() == "a8" and [u["after_episodes"] for u in old.updates()] == [8, 16]
    old.close()
    assert {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")} >= {"updates"}
    store = Store(path)  # opened to write: copied into versions once
    assert store.current_adapter() == "a8" and store.has_update(16) and not store.has_update(24)
    store.add_update(24, "a24", True, "ok", {})
    assert store.current_adapter() == "a24" and store.versions.in_force() == ("a24", 3)
    store.close()
    assert Store(path).versions.next_version() == 4  # not copied twice


def test_the_gate_keeps_a_candidate_within_tolerance_and_restores_below_it():
    def ask(adapter, checks):
        return [True] * (4 if adapter is None else 3) + [False] * (0 if adapter is None else 1)

    checks = list(range(4))
    assert Gate(0.25).judge(checks, ask, None, "cand")[0]  # 0.75 >= 1.00 - 0.25
    accepted, reason, record = Gate(0.2).judge(checks, ask, None, "cand", ids=list("abcd"), control=2)
    assert not accepted and "regression" in reason
    assert record["control"] == 2 and [c["id"] for c in record["checks"]] == list("abcd")
    assert record["before"] == 1.0 and record["after"] == 0.75
    assert Gate(0.0).judge([], ask, None, "cand") == (
        True,
        "no gate (nothing to ask: no control set, nothing done well yet)",
        {},
    )
