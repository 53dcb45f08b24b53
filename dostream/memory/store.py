"""The memory: notes the world taught, each linked to the stream segments that support it (`Memory`).

SQLite beside a stream store, opened and written through `dostream/sqlite.py` (WAL, synchronous
writes, one transaction per change), in five tables:

    notes   one per note: its text, kind (`extractive`: a world statement itself; `abstractive`: a
            rule a model wrote over several cases; `tool`: a learned tool's description), status
            (`active`, `superseded`, `forgotten`, `rolled_back`), what superseded it, when it was made, and the
            admission test's measured deltas
    links   one per cited span: a note's `evidence` (a world-authored segment that supports it) or
            its `situation` (what the note is about, the agent's own text allowed), with the
            stream id, segment index, character span, the segment's author, the quoted text, the
            source keys (stream, user, API key) and whether the note's text was written from it
    counts  one per counted event (supported, contradicted, used, helped), with its source keys:
            a note's counters are sums over these rows, so forgetting a source removes its counts
    notes_fts  the full-text index of active notes (`retrieve.py`), kept in the same transactions
    tools   one per learned tool (a note of kind `tool`, `tools.py`): its name, the environment it
            works in, its procedure, its verification status and record; erased with its note

The causal rule holds at the door: **only a world-authored segment can be evidence** (`EVIDENCE_AUTHORS`:
`stream.py`'s world authors less `protocol`, which is scaffolding that states nothing). A citation is
checked against the stream itself, never a claimed author: citing an `agent` or `context` segment
as evidence is an `EvidenceError` naming the stream, the segment and its author.

Tombstones keep history. `supersede(old, new)` marks the contradicted note `superseded` (its text
and links kept, `superseded_by` naming the correction) and counts a `contradicted` against it.
`forget(stream=|user=|key=)` deletes every link and count from that source; a note whose text was
written from it (the quoted span of an extractive note, any case of an abstractive one: the
writer saw it) or that is left with no evidence becomes a `forgotten` tombstone: its id, kind and
dates stay (so supersede chains still resolve), its text, links and counts are deleted. A note
written from other sources keeps its text and only their evidence. `secure_delete` is on and the WAL
is checkpointed after a forget, so the erased text does not linger in the file's free pages.
`rollback.py` puts the memory back to a version: later notes `rolled_back` (out, able to come back).

>>> mem = Memory(":memory:")
>>> s = Stream("s1", [Segment("agent", "Barnard's Star."), Segment("user", "No: Proxima Centauri.")])
>>> nid = mem.add("Proxima Centauri is the nearest star.", "extractive", evidence=[Cite(s, 1)])
>>> mem.note(nid).counters["supported"], mem.note(nid).evidence[0].author
(1, 'user')
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dostream.memory.scrub import admissions_without
from dostream.sqlite import connect, open_read_only, transaction
from dostream.stream import _WORLD, Segment, Stream  # noqa: F401  (Segment: the doctest)

# Who can support a note: the world's authors (stream.py's one table), less `protocol` (role
# headers, "Question:": scaffolding, not a statement). `agent` and `context` never can.
EVIDENCE_AUTHORS: frozenset[str] = _WORLD - {"protocol"}
KINDS = ("extractive", "abstractive", "tool")  # a tool: a procedure that worked (`tools.py`)
STATUSES = ("active", "superseded", "forgotten", "rolled_back")  # rolled_back: `rollback.py`
COUNTERS = ("supported", "contradicted", "used", "helped")
LINK_KINDS = ("evidence", "situation")

SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    superseded_by INTEGER,
    created REAL NOT NULL,
    changed REAL NOT NULL,
    admission TEXT,
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS links (
    id INTEGER PRIMARY KEY,
    note INTEGER NOT NULL,
    kind TEXT NOT NULL,
    stream TEXT NOT NULL,
    segment INTEGER NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    author TEXT NOT NULL,
    quote TEXT NOT NULL,
    user TEXT,
    key TEXT,
    written_from INTEGER NOT NULL,
    UNIQUE (note, kind, stream, segment, start, end)
);
CREATE INDEX IF NOT EXISTS links_note ON links (note);
CREATE INDEX IF NOT EXISTS links_stream ON links (stream);
CREATE TABLE IF NOT EXISTS counts (
    id INTEGER PRIMARY KEY,
    note INTEGER NOT NULL,
    counter TEXT NOT NULL,
    stream TEXT,
    user TEXT,
    key TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS counts_note ON counts (note);
CREATE VIRTUAL TABLE IF NOT EXISTS notes_fts USING fts5(text, situation, tokenize = 'porter unicode61');
"""
# A learned tool (`tools.py`) is a note of kind `tool` (its evidence, counters, forgetting are a
# note's) and a row here: its procedure and verification. Created on write, not required to read
# (a memory file from before tools opens read-only without it).
TOOLS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tools (
    note INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    env TEXT NOT NULL,
    procedure TEXT NOT NULL,
    status TEXT NOT NULL,
    verification TEXT,
    changed REAL NOT NULL
);
"""


class EvidenceError(ValueError):
    """A citation the causal rule refuses: a segment that is not world-authored, cited as evidence
    (or a segment or span that does not exist)."""


@dataclass(frozen=True)
class Source:
    """Where a count came from: a stream, the user it was with, the API key it came through."""

    stream: str | None = None
    user: str | None = None
    key: str | None = None

    @classmethod
    def of(cls, stream: Stream) -> Source:
        """A stream's source keys: its id, and `meta.user` / `meta.api_key` where the recorder set them."""
        user, key = stream.meta.get("user"), stream.meta.get("api_key")
        return cls(stream.id, None if user is None else str(user), None if key is None else str(key))


@dataclass(frozen=True)
class Cite:
    """A span of one segment of a stream: `span` is [start, end) in the segment's text (None: all
    of it). `written_from`: the note's text was written from this span (the quote of an extractive
    note, a case an abstractive note's writer saw); `forget` erases such a note with its source.
    A situation is never written from (the writer sees the world's words only)."""

    stream: Stream
    segment: int
    span: tuple[int, int] | None = None
    written_from: bool = True


@dataclass
class Link:
    kind: str
    stream: str
    segment: int
    start: int
    end: int
    author: str
    quote: str
    user: str | None
    key: str | None
    written_from: bool


@dataclass
class Note:
    id: int
    text: str
    kind: str
    status: str
    superseded_by: int | None
    created: float
    admission: dict[str, Any] | None
    meta: dict[str, Any]
    counters: dict[str, int] = field(default_factory=dict)
    evidence: list[Link] = field(default_factory=list)
    situation: list[Link] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["evidence"] = [vars(x) for x in self.evidence]
        d["situation"] = [vars(x) for x in self.situation]
        return d


def _link(kind: str, cite: Cite, authors: frozenset[str] = EVIDENCE_AUTHORS) -> tuple:
    s = cite.stream
    if not 0 <= cite.segment < len(s.segments):
        raise EvidenceError(f"stream {s.id!r} has no segment {cite.segment} (it has {len(s.segments)})")
    seg = s.segments[cite.segment]
    if kind == "evidence" and seg.author not in authors:
        raise EvidenceError(
            f"stream {s.id!r}, segment {cite.segment}: author {seg.author!r} cannot be evidence "
            f"(only the world's: {', '.join(sorted(authors))}); the agent's text may be a note's situation"
        )
    start, end = cite.span if cite.span is not None else (0, len(seg.text))
    if not 0 <= start < end <= len(seg.text):
        raise EvidenceError(
            f"stream {s.id!r}, segment {cite.segment}: span [{start}, {end}) is not inside its {len(seg.text)} characters"
        )
    src = Source.of(s)
    return (
        kind,
        s.id,
        cite.segment,
        start,
        end,
        seg.author,
        seg.text[start:end],
        src.user,
        src.key,
        int(cite.written_from and kind == "evidence"),  # a note is written from its evidence, never its situation
    )


class Memory:
    """One memory file. Every change is one transaction; a reader never sees half of one.

    `read_only=True` opens an existing memory for inspection (`list`, `show`, `query`), changing
    nothing in the file; writing through it raises."""

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        check_same_thread: bool = True,
        evidence_authors: frozenset[str] = EVIDENCE_AUTHORS,
    ):
        # `evidence_authors`: who may be cited as evidence; anything but the default is the memory
        # experiment's agent-trusting control (`experiments/memory/run.py`), never a library default
        self.path, self.read_only, self.evidence_authors = str(path), read_only, frozenset(evidence_authors)
        if read_only:
            self.db = open_read_only(self.path, SCHEMA, check_same_thread=check_same_thread)
        else:
            self.db = connect(self.path, SCHEMA + TOOLS_SCHEMA, check_same_thread=check_same_thread)
            self.db.execute("PRAGMA secure_delete=ON")  # forgotten text is overwritten, not left in free pages

    @classmethod
    def open_dir(
        cls,
        directory: str | Path,
        *,
        read_only: bool = False,
        check_same_thread: bool = True,
        evidence_authors: frozenset[str] = EVIDENCE_AUTHORS,
    ) -> Memory:
        """The memory of a directory (`DIR/memory.sqlite`), beside a stream store's file."""
        directory = Path(directory)
        if not read_only:
            directory.mkdir(parents=True, exist_ok=True)
        return cls(
            directory / "memory.sqlite",
            read_only=read_only,
            check_same_thread=check_same_thread,
            evidence_authors=evidence_authors,
        )

    def close(self) -> None:
        self.db.close()

    def _tx(self, statements: Iterable[tuple[str, tuple]]) -> None:
        if self.read_only:
            raise PermissionError(f"{self.path}: opened read-only")
        transaction(self.db, statements)

    # -- writing -----------------------------------------------------------------------------
    def add(
        self,
        text: str,
        kind: str,
        *,
        evidence: Sequence[Cite],
        situation: Sequence[Cite] = (),
        admission: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        also: Callable[[int], list[tuple[str, tuple]]] | None = None,
    ) -> int:
        """Add an active note with its evidence (world-authored spans, at least one) and situation
        (any spans), its `supported` counted once per evidence span, in one transaction. Returns its id.
        `also(id)`: more statements of the same change, in that transaction (a tool's row, `tools.py`)."""
        if kind not in KINDS:
            raise ValueError(f"note kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not text.strip():
            raise ValueError("a note needs text")
        if not evidence:
            raise EvidenceError("a note needs at least one evidence span from a world-authored segment")
        links = [_link("evidence", c, self.evidence_authors) for c in evidence] + [
            _link("situation", c) for c in situation
        ]
        unique: dict[tuple, tuple] = {}
        for x in links:  # a span cited twice is one link, counted once
            unique.setdefault(x[:5], x)
        links = list(unique.values())
        nid = (self.db.execute("SELECT MAX(id) FROM notes").fetchone()[0] or 0) + 1
        now = time.time()
        # a tool is offered once verified (`tools.py`), never retrieved as a note's text
        fts = "INSERT INTO notes_fts (rowid, text, situation) VALUES (?, ?, ?)"
        index = [] if kind == "tool" else [(fts, (nid, text, _situation(links)))]
        self._tx(
            [
                (
                    "INSERT INTO notes VALUES (?, ?, ?, 'active', NULL, ?, ?, ?, ?)",
                    (nid, text, kind, now, now, _dump(admission), json.dumps(meta or {}, ensure_ascii=False)),
                ),
                *self._link_rows(nid, links, now),
                *index,
                *(also(nid) if also is not None else []),
            ]
        )
        return nid

    def cite(self, note: int, evidence: Sequence[Cite]) -> None:
        """More evidence for an active note (a later stream that says the same): each new span
        counts `supported` once; a span already cited is not counted again."""
        self._active(note)
        known = set(self._rows("kind, stream, segment, start, end", note))
        links = [x for x in (_link("evidence", c, self.evidence_authors) for c in evidence) if x[:5] not in known]
        self._tx(self._link_rows(note, links, time.time()))

    def count(self, note: int, counter: str, source: Source = Source()) -> None:
        """Count one `used` (retrieved into a prompt), `helped`, `contradicted` or `supported` event."""
        if counter not in COUNTERS:
            raise ValueError(f"counter must be one of {', '.join(COUNTERS)}, got {counter!r}")
        self._note_row(note)
        self._tx([_count(note, counter, source, time.time())])

    def supersede(self, old: int, new: int) -> None:
        """`new` corrects `old`: `old` becomes a `superseded` tombstone (text and links kept, out of
        retrieval), `superseded_by` naming `new`, and one `contradicted` is counted against it from
        `new`'s first evidence source."""
        self._active(old)
        self._active(new)
        if old == new:
            raise ValueError(f"note {old} cannot supersede itself")
        first = self.db.execute(
            "SELECT stream, user, key FROM links WHERE note = ? AND kind = 'evidence' ORDER BY id LIMIT 1", (new,)
        ).fetchone()
        now = time.time()
        self._tx(
            [
                (
                    "UPDATE notes SET status = 'superseded', superseded_by = ?, changed = ? WHERE id = ?",
                    (new, now, old),
                ),
                ("DELETE FROM notes_fts WHERE rowid = ?", (old,)),
                _count(old, "contradicted", Source(*first), now),
            ]
        )

    def forget(self, *, stream: str | None = None, user: str | None = None, key: str | None = None) -> list[int]:
        """Remove every link and count that came from the source (exactly one of stream, user, key).
        Notes written from it, or left with no evidence, become `forgotten` tombstones (text erased).
        Returns the ids of the notes forgotten."""
        given = [(col, v) for col, v in (("stream", stream), ("user", user), ("key", key)) if v is not None]
        if len(given) != 1:
            raise ValueError("forget needs exactly one source: stream=, user= or key=")
        col, value = given[0]
        written = {
            n for (n,) in self.db.execute(f"SELECT DISTINCT note FROM links WHERE {col} = ? AND written_from", (value,))
        }
        touched = {n for (n,) in self.db.execute(f"SELECT DISTINCT note FROM links WHERE {col} = ?", (value,))}
        left = {
            n
            for (n,) in self.db.execute(
                f"SELECT DISTINCT note FROM links WHERE kind = 'evidence' AND NOT ({col} IS ?)", (value,)
            )
        }
        gone = sorted(written | (touched - left))
        now = time.time()
        erase = [
            (
                "UPDATE notes SET status = 'forgotten', text = '', admission = NULL, meta = '{}', changed = ? WHERE id = ?",
                (now, n),
            )
            for n in gone
        ]
        # the situation text a kept note is retrieved by, less the forgotten source's
        reindex = [
            ("UPDATE notes_fts SET situation = ? WHERE rowid = ?", (self._situation_without(n, col, value), n))
            for n in sorted(touched - set(gone))
            if self._note_row(n)[3] == "active"
        ]
        marks = ",".join("?" * len(gone))
        self._tx(
            [
                *admissions_without(self.db, col, value, set(gone)),  # the streams kept notes were tested on
                (f"DELETE FROM links WHERE {col} = ? OR note IN ({marks})", (value, *gone)),
                (f"DELETE FROM counts WHERE {col} = ? OR note IN ({marks})", (value, *gone)),
                (f"DELETE FROM notes_fts WHERE rowid IN ({marks})", tuple(gone)),
                (f"DELETE FROM tools WHERE note IN ({marks})", tuple(gone)),  # a forgotten tool's procedure
                *erase,
                *reindex,
                # FTS5 keeps a deleted row's terms in its index until a merge: merge, so none remain
                ("INSERT INTO notes_fts (notes_fts) VALUES ('optimize')", ()),
            ]
        )
        if self.path != ":memory:":
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return gone

    # -- reading -----------------------------------------------------------------------------
    def note(self, note: int) -> Note:
        """One note, whatever its status, with its counters, evidence and situation."""
        nid, text, kind, status, by, created, _changed, admission, meta = self._note_row(note)
        counters = dict.fromkeys(COUNTERS, 0)
        for counter, n in self.db.execute(
            "SELECT counter, COUNT(*) FROM counts WHERE note = ? GROUP BY counter", (nid,)
        ):
            counters[counter] = n
        links = [Link(*r[:-1], bool(r[-1])) for r in self._rows(", ".join(_LINK_COLS), nid)]
        return Note(
            nid,
            text,
            kind,
            status,
            by,
            created,
            json.loads(admission) if admission else None,
            json.loads(meta),
            counters,
            [x for x in links if x.kind == "evidence"],
            [x for x in links if x.kind == "situation"],
        )

    def notes(self, status: str | None = "active") -> list[Note]:
        """Every note with `status` (None: all), oldest first."""
        where, args = ("", ()) if status is None else ("WHERE status = ?", (status,))
        return [self.note(n) for (n,) in self.db.execute(f"SELECT id FROM notes {where} ORDER BY id", args)]

    def find(self, text: str) -> int | None:
        """The active note with exactly this text, if any (distilling the same statement twice cites it)."""
        row = self.db.execute("SELECT id FROM notes WHERE status = 'active' AND text = ?", (text,)).fetchone()
        return None if row is None else row[0]

    def history(self, note: int) -> list[Note]:
        """The note and every note that superseded it after, in order."""
        chain = [self.note(note)]
        while chain[-1].superseded_by is not None and len(chain) <= 10_000:
            chain.append(self.note(chain[-1].superseded_by))
        return chain

    # -- internals -------------------------------------------------------------------------
    def _note_row(self, note: int) -> tuple:
        row = self.db.execute("SELECT * FROM notes WHERE id = ?", (int(note),)).fetchone()
        if row is None:
            raise KeyError(f"{self.path}: no note {note}")
        return row

    def _active(self, note: int) -> None:
        status = self._note_row(note)[3]
        if status != "active":
            raise ValueError(f"note {note} is {status}, not active")

    def _rows(self, columns: str, note: int) -> list[tuple]:
        return self.db.execute(f"SELECT {columns} FROM links WHERE note = ? ORDER BY id", (note,)).fetchall()

    def _link_rows(self, note: int, links: list[tuple], now: float) -> list[tuple[str, tuple]]:
        rows = []
        for x in links:
            rows.append(
                (
                    f"INSERT OR IGNORE INTO links ({', '.join(_LINK_COLS)}, note) VALUES "
                    f"({', '.join('?' * (len(_LINK_COLS)))}, ?)",
                    (*x, note),
                )
            )
            if x[0] == "evidence":
                rows.append(_count(note, "supported", Source(x[1], x[7], x[8]), now))
        return rows

    def _situation_without(self, note: int, col: str, value: str) -> str:
        rows = self.db.execute(
            f"SELECT quote FROM links WHERE note = ? AND kind = 'situation' AND NOT ({col} IS ?) ORDER BY id",
            (note, value),
        )
        return "\n".join(q for (q,) in rows)


_LINK_COLS = ("kind", "stream", "segment", "start", "end", "author", "quote", "user", "key", "written_from")


def _situation(links: list[tuple]) -> str:
    """What a note is about, for retrieval: the quoted text of its situation links (`_link` rows)."""
    return "\n".join(x[6] for x in links if x[0] == "situation")


def _count(note: int, counter: str, source: Source, now: float) -> tuple[str, tuple]:
    return (
        "INSERT INTO counts (note, counter, stream, user, key, created) VALUES (?, ?, ?, ?, ?, ?)",
        (note, counter, source.stream, source.user, source.key, now),
    )


def _dump(obj: dict[str, Any] | None) -> str | None:
    return None if obj is None else json.dumps(obj, ensure_ascii=False)
