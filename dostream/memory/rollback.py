"""A memory put back to a version (`roll_back`): what a tenant's snapshot rollback does to its memory.

A memory's version is its newest note's id, counting neither a `rolled_back` note nor a
`forgotten` one (`version_of`; 0: none): notes get ids in order, so the version is where the
memory stood. `roll_back(memory, version)` puts it back there, in one transaction (a kill leaves
it before or after), changing no note's text:

- a note with a greater id, `active` or `superseded`, becomes `rolled_back`: out of retrieval (its
  FTS row deleted) and of everything that reads `active` notes (`find`, `notes()`, tools on
  offer, distillation, consolidation), its text, links, counts and `superseded_by` kept;
- a note at or below the version that was superseded by a note above it is `active` again
  (`superseded_by` cleared, the correction remembered in the `unsuperseded` table);
- **roll forward**: a `rolled_back` note at or below the version comes back (`active`, or
  `superseded` if its correction is in the memory at the version), and a note a correction that
  comes back had superseded is superseded again. A note comes back only if no note was added
  while it was rolled back: a note added then means the memory's history branched (the version
  of a snapshot taken on that branch holds the note out); if that later note is above the
  version the rollback is refused (`RollbackError`: restoring the note would lose the branch's
  record), if at or below, the note stays out (it was out at that version too);
- a `forgotten` note stays forgotten, its erased text with it: nothing is un-forgotten;
- `since` (the snapshot's time): the `used` and `helped` counts of kept notes made after it are
  deleted (counts carry their time). Not put back, because nothing dates them: evidence cited to
  a kept note after the snapshot (`Memory.cite`: links carry no time; its `supported` counts stay
  with it) and a supersession between two kept notes made after it. Counts deleted here do not
  come back on a roll forward.

Rolling back to the current version changes nothing; a version above the newest note is a
ValueError naming `version`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dostream.memory.store import Memory

ROLLED_BACK = "rolled_back"
# A note a rollback made active again, and the correction (rolled back) that had superseded it:
# what a roll forward supersedes it with again. Created on the first rollback.
UNSUPERSEDED_SCHEMA = """
CREATE TABLE IF NOT EXISTS unsuperseded (
    note INTEGER PRIMARY KEY,
    superseded_by INTEGER NOT NULL
);
"""
NOT_RESTORED = ("memory citations since the snapshot", "memory supersessions between kept notes since the snapshot")


class RollbackError(ValueError):
    """A rollback the memory's history cannot make exactly (a note it would restore was rolled back
    and notes were added after it)."""


@dataclass
class Rolled:
    """What `roll_back` changed: note ids taken out, brought back, made active again, superseded again."""

    version: int
    rolled_back: list[int] = field(default_factory=list)
    restored: list[int] = field(default_factory=list)
    reactivated: list[int] = field(default_factory=list)
    resuperseded: list[int] = field(default_factory=list)
    counts_removed: int = 0

    def to_json(self) -> dict:
        return dict(vars(self))


def version_of(db) -> int:
    """A memory's version (`db`: its connection, read-only or not): its newest note's id that is
    neither rolled back nor forgotten (0: none)."""
    q = "SELECT COALESCE(MAX(id), 0) FROM notes WHERE status NOT IN ('rolled_back', 'forgotten')"
    return int(db.execute(q).fetchone()[0])


def roll_back(memory: Memory, version: int, *, since: float | None = None) -> Rolled:
    """Put `memory` back to `version` (see the module doc), in one transaction. Raises ValueError
    for a bad version, `RollbackError` for a branched history."""
    done: list[Rolled] = []

    def statements():  # planned inside the transaction: no note lands between the plan and its writes
        planned, rolled = plan(memory, version, since=since)
        done.append(rolled)
        yield from planned

    memory._tx(statements())
    return done[0]


def put_back(memory: Memory, version: int, *, since: float | None = None, check: bool = False) -> dict:
    """`roll_back` as a tenant's snapshot rollback asks it (`Rolled.to_json`); `check`: only raise
    what it would raise (a bad version, a branched history), changing nothing."""
    if check:
        return plan(memory, version, since=since)[1].to_json()
    return roll_back(memory, version, since=since).to_json()


def plan(memory: Memory, version: int, *, since: float | None = None) -> tuple[list[tuple[str, tuple]], Rolled]:
    """The statements `roll_back` runs (none: nothing to change) and what they change; raises what
    it raises. Changes nothing, so a caller can check a rollback before making others."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version: a memory version is a note id, an integer >= 0, got {version!r}")
    if memory.read_only:
        raise PermissionError(f"{memory.path}: opened read-only")
    db = memory.db
    rows = {r[0]: r for r in db.execute("SELECT id, kind, status, superseded_by, changed FROM notes ORDER BY id")}
    newest = max(rows, default=0)
    if version > newest:
        raise ValueError(f"version: {version} is above the memory's newest note ({newest})")
    made = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'unsuperseded'").fetchone()
    was = dict(db.execute("SELECT note, superseded_by FROM unsuperseded")) if made else {}
    status = {n: r[2] for n, r in rows.items()}
    by = {n: r[3] for n, r in rows.items()}
    done = Rolled(version)
    for n, (_, _, st, _, changed) in rows.items():
        if n > version and st in ("active", "superseded"):
            status[n] = ROLLED_BACK
            done.rolled_back.append(n)
        elif n <= version and st == ROLLED_BACK:
            after = db.execute("SELECT MIN(id) FROM notes WHERE id > ? AND created >= ?", (n, changed)).fetchone()[0]
            if after is None:
                done.restored.append(n)
            elif after > version:
                raise RollbackError(
                    f"version: note {n} was rolled back and note {after} was added after it, so the memory's "
                    f"history branched; bringing note {n} back to version {version} would lose that branch"
                )
    back = set(done.restored)
    status.update(dict.fromkeys(back, "active"))  # in the memory at the version (superseded or not: below)

    def there(s: int | None) -> bool:  # in the memory at the version (a forgotten correction stays one)
        return s is not None and s <= version and status[s] != ROLLED_BACK

    unsup: dict[int, int | None] = {}  # the table's changes: note -> its correction (None: the row goes)
    for n in sorted(rows):
        correction = by[n] if by[n] is not None else was.get(n)
        if n in back:
            status[n] = "superseded" if there(correction) else "active"
            by[n] = correction if status[n] == "superseded" else None
            if correction is not None:
                unsup[n] = None if status[n] == "superseded" else correction
        elif n <= version and status[n] == "superseded" and not there(by[n]):
            status[n], unsup[n], by[n] = "active", by[n], None
            done.reactivated.append(n)
        elif n <= version and status[n] == "active" and n in was and was[n] in back:
            status[n], by[n], unsup[n] = "superseded", was[n], None
            done.resuperseded.append(n)
    counts = []
    if since is not None:
        q = "SELECT COUNT(*) FROM counts WHERE note <= ? AND counter IN ('used', 'helped') AND created > ?"
        done.counts_removed = int(db.execute(q, (version, since)).fetchone()[0])
        if done.counts_removed:
            counts = [
                (
                    "DELETE FROM counts WHERE note <= ? AND counter IN ('used', 'helped') AND created > ?",
                    (version, since),
                )
            ]
    changed = [n for n in sorted(rows) if status[n] != rows[n][2] or by[n] != rows[n][3]]
    if not changed and not counts:
        return [], done
    table = [(UNSUPERSEDED_SCHEMA.strip(), ())]
    return [*table, *_writes(db, rows, status, by, changed), *_unsuperseded(unsup), *counts], done


def _writes(db, rows: dict, status: dict, by: dict, changed: list[int]) -> list[tuple[str, tuple]]:
    now, out = time.time(), []
    for n in changed:
        out.append(
            ("UPDATE notes SET status = ?, superseded_by = ?, changed = ? WHERE id = ?", (status[n], by[n], now, n))
        )
        if rows[n][1] == "tool":  # a tool is offered from its row, never retrieved as a note's text
            continue
        if rows[n][2] == "active" and status[n] != "active":
            out.append(("DELETE FROM notes_fts WHERE rowid = ?", (n,)))
        elif rows[n][2] != "active" and status[n] == "active":
            text = db.execute("SELECT text FROM notes WHERE id = ?", (n,)).fetchone()[0]
            quotes = db.execute("SELECT quote FROM links WHERE note = ? AND kind = 'situation' ORDER BY id", (n,))
            situation = "\n".join(q for (q,) in quotes)
            out.append(("INSERT INTO notes_fts (rowid, text, situation) VALUES (?, ?, ?)", (n, text, situation)))
    out.append(("INSERT INTO notes_fts (notes_fts) VALUES ('optimize')", ()))  # no rolled-back terms linger
    return out


def _unsuperseded(changes: dict[int, int | None]) -> list[tuple[str, tuple]]:
    return [
        ("DELETE FROM unsuperseded WHERE note = ?", (n,))
        if s is None
        else ("INSERT OR REPLACE INTO unsuperseded (note, superseded_by) VALUES (?, ?)", (n, s))
        for n, s in sorted(changes.items())
    ]
