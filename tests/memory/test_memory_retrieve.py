"""Retrieval: the note for a matching situation, only active notes, and notes entering a prompt as
one `context` segment that no view supervises."""

from __future__ import annotations

import pytest
from memory_helpers import RULE, capital_stream, discount_stream

from dostream.memory.retrieve import Lexical, as_context, fts_query, retrieve
from dostream.memory.store import Cite, Memory
from dostream.render import Renderer
from dostream.stream import VIEWS, Segment, Stream, stream_from_json


@pytest.fixture
def mem():
    m = Memory(":memory:")
    d, c = discount_stream(0, "teacher"), capital_stream(0)
    m.add(RULE, "extractive", evidence=[Cite(d, 5)], situation=[Cite(d, 1), Cite(d, 3)])
    m.add("Wrong, it is Paris.", "extractive", evidence=[Cite(c, 2)], situation=[Cite(c, 0)])
    return m


def test_the_matching_note_comes_first(mem):
    assert [n.text for n in retrieve(mem, "Does a physician qualify for a discount?", k=1)] == [RULE]
    assert [n.text for n in retrieve(mem, "capital city of France", k=1)] == ["Wrong, it is Paris."]
    # the situation's words count too: "teacher" is only in the first note's situation
    assert [n.text for n in retrieve(mem, "I am a teacher", k=4)] == [RULE]
    assert retrieve(mem, "the of and", k=4) == [] and retrieve(mem, "", k=4) == []


def test_superseded_and_forgotten_notes_are_not_retrieved(mem):
    d = discount_stream(1, "nurse", rule="Only veterans qualify for the discount now.")
    new = mem.add(d.segments[5].text, "extractive", evidence=[Cite(d, 5)])
    mem.supersede(1, new)
    assert [n.id for n in retrieve(mem, "discount veterans physicians", k=4)] == [new]
    mem.forget(stream="d1")
    assert retrieve(mem, "discount veterans physicians", k=4) == []


def test_fts_syntax_in_a_situation_is_only_words(mem):
    assert fts_query('NEAR("discount" OR) * ^col:x') == '"near" OR "discount" OR "col" OR "x"'
    assert retrieve(mem, 'discount" OR "*', k=1)[0].text == RULE


def test_another_retriever_plugs_in(mem):
    class Nearest:  # what an embedding retriever returns: ids, best first (here a superseded one too)
        def search(self, situation: str, k: int) -> list[tuple[int, float]]:
            return [(1, 0.9), (2, 0.5)][:k]

    d = discount_stream(2, "pilot", rule="Only veterans qualify.")
    mem.supersede(1, mem.add("Only veterans qualify.", "extractive", evidence=[Cite(d, 5)]))
    assert [n.id for n in retrieve(mem, "anything", k=2, retriever=Nearest())] == [2]
    assert [nid for nid, _ in Lexical(mem).search("veterans", 4)] == [3]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_notes_enter_a_prompt_as_one_unsupervised_context_segment(mem, tok, chat):
    notes = retrieve(mem, "Can I get the discount as a physician?", k=2)
    seg = as_context(notes)
    assert seg.author == "context" and seg.meta["memory_notes"] == [n.id for n in notes]
    assert all(n.text in seg.text for n in notes)
    stream = Stream("s", [seg, Segment("user", "Can I get the discount as a physician?"), Segment("agent", "No.")])
    r = Renderer(tok, chat_template=chat).render(stream)
    start = r.text.index(notes[0].text)
    note_tokens = [i for i, o in enumerate(r.offsets) if o is not None and start <= o[0] < start + len(notes[0].text)]
    assert note_tokens and all(r.authors[i] == "context" for i in note_tokens)
    for view in VIEWS:
        sup = r.supervised(view)
        assert not any(sup[i] for i, a in enumerate(r.authors) if a == "context"), view
    # the recorded stream says which notes the model saw
    again = stream_from_json(stream.to_json())
    assert again.segments[0].meta["memory_notes"] == [n.id for n in notes]
    with pytest.raises(ValueError, match="no notes"):
        as_context([])


def test_a_forgotten_situation_no_longer_finds_a_kept_note():
    mem = Memory(":memory:")
    a = Stream("a", [Segment("user", "Is the zeppelin ride refundable?"), Segment("agent", "Yes.")])
    b = Stream("b", [Segment("agent", "Refunds?"), Segment("teacher", "Refunds only within 30 days.")])
    nid = mem.add(b.segments[1].text, "extractive", evidence=[Cite(b, 1)], situation=[Cite(a, 0)])
    assert [n.id for n in retrieve(mem, "zeppelin")] == [nid]
    assert mem.forget(stream="a") == []
    assert retrieve(mem, "zeppelin") == [] and [n.id for n in retrieve(mem, "refunds")] == [nid]
