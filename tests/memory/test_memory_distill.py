"""Distillation: cases are world statements (the agent's turn only their situation), extractive
notes admitted by the world-model test with their deltas recorded, abstractive notes from a writer
(a local model through dostream's sampler, an OpenAI-compatible endpoint) over a cluster of cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memory_helpers import RULE, CopyLM, capital_stream, discount_stream

from dostream.memory.distill import DistillConfig, cases, cluster, distill
from dostream.memory.store import EVIDENCE_AUTHORS, Memory
from dostream.memory.writer import EndpointWriter, LocalWriter
from dostream.models import tiny_model
from dostream.render import Renderer
from dostream.sampling import SamplingConfig
from dostream.stream import AUTHORS, Segment, Stream

STREAMS = [discount_stream(i, w) for i, w in enumerate(["teacher", "nurse", "pilot", "farmer"])] + [
    capital_stream(i) for i in range(2)
]


def test_cases_are_world_statements_and_the_agent_is_their_situation():
    tool = Stream(
        "t",
        [
            Segment("user", "What is 2+3?"),
            Segment("agent", "calc(2+3)"),
            Segment("tool", " 5 "),
            Segment("teacher", "Greetings.\nRefunds are only allowed within 30 days.\nMust I keep the receipt?\n"),
        ],
    )
    found = cases(tool)
    assert [(c.kind, c.segment, c.text) for c in found] == [
        ("tool", 2, "5"),
        ("policy", 3, "Refunds are only allowed within 30 days."),
    ]  # the question ("must") states no rule: not a case
    assert found[0].situation == (0, 1)  # the question, then the agent's call
    [case] = cases(discount_stream(0, "teacher"))
    assert (case.kind, case.text, case.situation) == ("correction", RULE, (1, 3))
    assert all(c.stream.segments[c.segment].author in EVIDENCE_AUTHORS for s in STREAMS for c in cases(s))


def test_similar_cases_cluster_together():
    groups = cluster([c for s in STREAMS for c in cases(s)], similarity=0.2)
    assert [[c.stream.id for c in g] for g in groups] == [["d0", "d1", "d2", "d3"], ["c0", "c1"]]


def test_distil_admits_the_worlds_words_with_their_deltas_and_cites_them_again(tok):
    mem = Memory(":memory:")
    model, r = CopyLM(len(tok)), Renderer(tok)
    records = distill(STREAMS, mem, model, r, DistillConfig(max_others=2))
    stored = {n.text: n for n in mem.notes()}
    assert set(stored) == {RULE, "Wrong, it is Paris."}
    note = stored[RULE]
    assert note.kind == "extractive" and note.admission["admitted"]
    assert note.admission["covered"]["streams"] == ["d1", "d2", "d3"] and note.admission["covered"]["delta"] > 0
    assert note.admission["others"]["streams"] == ["c0", "c1"]
    assert [(x.stream, x.written_from) for x in note.evidence] == [("d0", True)] + [(f"d{i}", False) for i in (1, 2, 3)]
    assert {x.author for n in mem.notes() for x in n.evidence} <= EVIDENCE_AUTHORS
    assert "agent" in {x.author for x in note.situation}
    assert note.counters["supported"] == 4
    assert all("delta" in rec["admission"]["covered"] for rec in records)
    # the same streams again: nothing new is stored, the known notes are cited (and not counted twice)
    again = distill(STREAMS, mem, model, r, DistillConfig(max_others=2))
    assert all(rec["admission"]["reason"] == "already in memory: cited" for rec in again)
    assert len(mem.notes(None)) == 2 and mem.note(note.id).counters["supported"] == 4


def test_distil_refuses_duplicate_stream_ids(tok):
    with pytest.raises(ValueError, match="stream id 'd0' appears twice"):
        distill([STREAMS[0], STREAMS[0]], Memory(":memory:"), CopyLM(len(tok)), Renderer(tok))


class Fixed:
    """A writer that has already written (e.g. the rules a person would): what the flow does with them."""

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def write(self, cases, k):
        self.calls.append((list(cases), k))
        return self.texts[:k]


def test_an_abstractive_note_is_written_from_half_the_cluster_and_tested_on_the_rest(tok):
    mem = Memory(":memory:")
    streams = [
        discount_stream(i, w, rule=f"No: a {w} does not qualify; only veterans and physicians do.")
        for i, w in enumerate(["teacher", "nurse", "pilot", "farmer"])
    ] + [capital_stream(0)]
    writer = Fixed(["Only veterans and physicians qualify for the discount.", "Bananas grow in warm wet places."])
    records = distill(
        streams, mem, CopyLM(len(tok)), Renderer(tok), DistillConfig(extractive=False, k=2), writer=writer
    )
    [(shown, k)] = writer.calls
    assert k == 2 and shown == [streams[0].segments[5].text, streams[2].segments[5].text]  # d0, d2
    by_text = {rec["text"]: rec for rec in records}
    assert not by_text["Bananas grow in warm wet places."]["admitted"]
    rule = by_text["Only veterans and physicians qualify for the discount."]
    assert rule["admitted"] and rule["admission"]["covered"]["streams"] == ["d1", "d3"]
    note = mem.note(rule["note"])
    assert note.kind == "abstractive"
    assert [(x.stream, x.written_from) for x in note.evidence] == [
        ("d0", True),
        ("d2", True),
        ("d1", False),
        ("d3", False),
    ]
    # the same rule written again is not stored twice
    again = distill(streams, mem, CopyLM(len(tok)), Renderer(tok), DistillConfig(extractive=False, k=2), writer=writer)
    assert [r["text"] for r in again] == ["Bananas grow in warm wet places."]
    assert [n.id for n in mem.notes()] == [note.id]
    # a held-out stream forgotten: the note keeps the rest; a stream it was written from: it goes
    assert mem.forget(stream="d1") == [] and mem.note(note.id).status == "active"
    assert mem.forget(stream="d2") == [note.id] and mem.note(note.id).text == ""


def test_a_local_writer_samples_k_candidates_with_dostreams_sampler(tok):
    writer = LocalWriter(tiny_model(), tok, SamplingConfig(max_new_tokens=6, seed=1, precision="fp32"))
    out = writer.write(["Only veterans qualify.", "Physicians qualify too."], 3)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)


def test_an_endpoint_writer_asks_an_openai_compatible_server(served):
    writer = EndpointWriter(served.url + "/v1", "tiny", api_key="sk-test-admin", max_tokens=6)
    out = writer.write(["Only veterans qualify.", "Physicians qualify too."], 2)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_a_note_that_only_repeats_an_admitted_one_is_refused(tok):
    """The cases differ in one word: the first is admitted; each later one is tested with it in
    context in both renderings and adds nothing the held-out streams need."""
    mem = Memory(":memory:")
    streams = [
        discount_stream(i, w, rule=f"No: a {w} does not qualify. Only veterans and physicians qualify.")
        for i, w in enumerate(["teacher", "nurse", "pilot", "farmer"])
    ]
    records = distill(streams, mem, CopyLM(len(tok)), Renderer(tok), DistillConfig(max_others=0))
    assert [r["admitted"] for r in records] == [True, False, False, False]
    assert [r["admission"]["given"] for r in records] == [0, 1, 1, 1]
    assert all(r["admission"]["covered"]["delta"] <= 0.1 for r in records[1:])
    assert [n.text for n in mem.notes()] == [streams[0].segments[5].text]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(AUTHORS), st.sampled_from(["Yes.", "Only members may enter.\nOk", " ", "It is 5."])),
        min_size=1,
        max_size=7,
    )
)
def test_no_case_is_ever_the_agents_words(parts):
    """Over random streams: every case is a span of a world-authored segment (never `agent`,
    `context` or `protocol`), inside it, and its situations come before it."""
    s = Stream("r", [Segment(a, t) for a, t in parts])
    for c in cases(s):
        assert s.segments[c.segment].author in EVIDENCE_AUTHORS
        assert 0 <= c.start < c.end <= len(s.segments[c.segment].text) and c.text.strip() == c.text
        assert all(i < c.segment for i in c.situation)
