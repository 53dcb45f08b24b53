"""How every dostream store is opened and written: SQLite, append-only, WAL, one transaction per write. Knows no table.

The agent's store (`agent/store.py`), the server's (`serve/store.py`) and the versions table
(`learning/versions.py`) all open their files here, so durability is decided once: synchronous
writes, readers that never block the writer, read-only opens that change nothing in the file.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path


class StoreError(ValueError):
    """A file that is not a dostream store (another program's SQLite file, or not SQLite at all)."""


def _tables(schema: str) -> set[str]:
    return set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", schema))


def open_read_only(path: str | Path, schema: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open an existing store to read it, changing nothing in the file (no tables created, no
    journal mode switched): what `streams export` and `report` use. A file that is not SQLite, or
    lacks the schema's tables, is a `StoreError`. On a read-only mount, where SQLite cannot create
    the WAL's shared-memory file, the store is opened as immutable."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such store")
    uri = path.resolve().as_uri()
    for mode in ("?mode=ro", "?mode=ro&immutable=1"):
        try:
            db = sqlite3.connect(uri + mode, uri=True, isolation_level=None, check_same_thread=check_same_thread)
            names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            break
        except sqlite3.OperationalError:
            continue  # e.g. "unable to open database file": the WAL's -shm cannot be made here
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path}: not a dostream store ({e})") from None
    else:
        raise StoreError(f"{path}: cannot be opened for reading")
    missing = _tables(schema) - names
    if missing:
        db.close()
        raise StoreError(f"{path}: not a dostream store (no table {', '.join(sorted(missing))})")
    return db


def connect(path: str | Path, schema: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """The one way dostream opens an append-only store: autocommit mode (writes go through
    `transaction`), WAL (readers never block the writer), synchronous writes, `schema` applied.
    Every dostream store is opened here."""
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=check_same_thread)
    if str(path) != ":memory:":
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut too
    db.executescript(schema)
    return db


def transaction(db: sqlite3.Connection, statements: Iterable[tuple[str, tuple]]) -> None:
    """Run `statements` as one transaction: all of them land, or none (a kill mid-way leaves nothing)."""
    cur = db.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        for sql, args in statements:
            cur.execute(sql, args)
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")
