"""Retrieval: the active notes that bear on the current situation, and the one way they enter a prompt.

**Lexical, with SQLite FTS5** (bm25 ranking, built into Python's `sqlite3`). Chosen over `bm25s`
because the index lives in the memory's own file and is written in the same transaction as the
note it indexes (`store.py`): a note added, superseded or forgotten is in or out of retrieval the
moment its transaction commits, with no index to rebuild or keep in step, and no new dependency.
The index holds each note's text and the text of its situations (what it was about), the
situation weighted half; the Porter stemmer makes "qualify" find "qualifies". A situation is
turned into an OR of its words (quoted: no FTS syntax from user text), common words dropped.

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


def retrieve(memory: Memory, situation: str, k: int = 4, *, retriever: Retriever | None = None) -> list[Note]:
    """The `k` active notes that best match `situation` (lexical unless another retriever is given)."""
    found = (retriever or Lexical(memory)).search(situation, k)
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
