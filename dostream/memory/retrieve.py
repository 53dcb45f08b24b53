"""Retrieval: the active notes that bear on the current situation, and the one way they enter a prompt.

**Lexical.** The memory file keeps an SQLite FTS5 index of the active notes, written in the same
transaction as the note it indexes (`store.py`): a note added, superseded or forgotten is in or
out of it the moment its transaction commits. Retrieval ranks by bm25 with `bm25s` (`Bm25`, the
default) over the index's rows, rebuilt whenever the index changes: FTS5's own bm25 (`Lexical`,
a situation turned into an OR of its quoted words) scores every note sharing a word with the
situation, 87 ms a query at 100,000 notes where `bm25s` takes under 1 ms
(`benchmarks/memory_retrieval.py`). Both index each note's text with its situations (what it was
about) and stem ("qualify" finds "qualifies"); common words are dropped.

**Another retriever plugs in through `Retriever`**: anything with `search(situation, k)` returning
(note id, score) pairs, best first. An embedding retriever embeds `memory.notes()`'s texts once
(and each note added after), and answers with the nearest ids; `retrieve(..., retriever=)` then
reads the notes from the store, so only active notes are ever returned.

**Into a prompt as one `context` segment** (`as_context`): never a training target under any view,
its `meta.memory_notes` naming the note ids, so the recorded stream says exactly which notes the
model saw, and a later `dostream train` renders what the model was conditioned on.

>>> from dostream.memory.store import Cite, Memory
>>> from dostream.stream import Segment, Stream
>>> mem = Memory(":memory:")
>>> s = Stream("s", [Segment("user", "Only veterans and physicians qualify for the discount.")])
>>> nid = mem.add(s.segments[0].text, "extractive", evidence=[Cite(s, 0)])
>>> [n.id for n in retrieve(mem, "Does a physician qualify for a discount?")] == [nid]
True
>>> as_context(retrieve(mem, "physician discount")).meta["memory_notes"] == [nid]
True
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import Protocol

from dostream.memory.store import Memory, Note
from dostream.stream import Segment

# Words too common to rank by; their posting lists are the longest (a query of them is slow).
STOPWORDS = frozenset(
    "a an and are as at be but by can do does for from has have how i if in is it its me my no not of on or "
    "our so that the their them then there these they this to was we were what when where which who why "
    "will with would you your".split()
)
MAX_TERMS = 64  # a long situation is cut to its first 64 distinct words


class Retriever(Protocol):
    """What retrieval asks of a retriever: the ids of active notes for a situation, best first."""

    def search(self, situation: str, k: int) -> list[tuple[int, float]]: ...


class Lexical:
    """bm25 over the memory's FTS5 index (notes' text, situations at half weight)."""

    def __init__(self, memory: Memory):
        self.memory = memory

    def search(self, situation: str, k: int) -> list[tuple[int, float]]:
        query = fts_query(situation)
        if not query or k <= 0:
            return []
        rows = self.memory.db.execute(
            "SELECT rowid, bm25(notes_fts, 1.0, 0.5) AS score FROM notes_fts WHERE notes_fts MATCH ? "
            "ORDER BY score LIMIT ?",
            (query, k),
        ).fetchall()
        return [(nid, -score) for nid, score in rows]  # FTS5's bm25 is lower-is-better


def fts_query(text: str) -> str:
    """An FTS5 query matching any of the text's words, each quoted (so no text is FTS syntax).

    >>> fts_query('Do veterans "qualify"? NOT AND')
    '"veterans" OR "qualify"'
    """
    terms: list[str] = []
    for word in re.findall(r"\w+", text.lower()):
        if word not in STOPWORDS and word not in terms:
            terms.append(word)
        if len(terms) == MAX_TERMS:
            break
    return " OR ".join(f'"{t}"' for t in terms)


class Bm25:
    """bm25 with `bm25s` (sparse matrices) over the active notes' text and situations, Snowball
    stems (`PyStemmer`), the same stop words: the default, because FTS5's bm25 scores every note
    that shares a word with the situation (at 100,000 support-shaped notes, p50 87 ms a query on
    the 2-core machine, `benchmarks/memory_retrieval.py`) where `bm25s` scores a sparse product
    (under 1 ms there). The index is built from the file on first use and again after the notes
    in it change (a note added, superseded or forgotten), so what it returns is what the file holds; a build
    costs ~4 s at 100,000 notes, ~ms at a few hundred."""

    _built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # memory -> (stamp, index, ids, tokenizer)

    def __init__(self, memory: Memory):
        self.memory = memory

    def _index(self):
        import bm25s
        import Stemmer
        from bm25s.tokenization import Tokenizer

        # FTS5's structure record is rewritten by every write to the index (a note in or out), and
        # by nothing else: a cheap stamp of what the index holds (a count over the notes is a scan).
        stamp = self.memory.db.execute(
            "SELECT (SELECT block FROM notes_fts_data WHERE id = 10), (SELECT MAX(id) FROM notes)"
        ).fetchone()
        built = self._built.get(self.memory)
        if built is not None and built[0] == stamp:
            return built[1:]
        rows = self.memory.db.execute("SELECT rowid, text, situation FROM notes_fts ORDER BY rowid").fetchall()
        ids = [r[0] for r in rows]
        tokenizer = Tokenizer(stopwords=sorted(STOPWORDS), stemmer=Stemmer.Stemmer("english").stemWord)
        index = bm25s.BM25()
        if rows:
            corpus = tokenizer.tokenize([f"{t} {s or ''}" for _, t, s in rows], show_progress=False)
            index.index(corpus, show_progress=False)
        self._built[self.memory] = (stamp, index, ids, tokenizer)
        return index, ids, tokenizer

    def search(self, situation: str, k: int) -> list[tuple[int, float]]:
        index, ids, tokenizer = self._index()
        if not ids or k <= 0:
            return []
        query = tokenizer.tokenize([situation], update_vocab=False, show_progress=False)
        if not any(query[0]):
            return []
        found, scores = index.retrieve(query, k=min(k, len(ids)), show_progress=False)
        return [(ids[int(i)], float(sc)) for i, sc in zip(found[0], scores[0]) if sc > 0]


def retrieve(memory: Memory, situation: str, k: int = 4, *, retriever: Retriever | None = None) -> list[Note]:
    """The `k` active notes that best match `situation` (`Bm25` unless another retriever is given)."""
    found = (retriever or Bm25(memory)).search(situation, k)
    notes = [memory.note(nid) for nid, _ in found]
    return [n for n in notes if n.status == "active"][:k]


CONTEXT_HEADER = "Notes from what the world said before:\n"


def as_context(notes: Sequence[Note]) -> Segment:
    """Retrieved notes as ONE `context` segment (never supervised in any view), its
    `meta.memory_notes` the note ids in the order shown."""
    if not notes:
        raise ValueError("no notes to put in context")
    text = CONTEXT_HEADER + "".join(f"- {' '.join(n.text.split())}\n" for n in notes)
    return Segment("context", text, meta={"memory_notes": [n.id for n in notes]})
