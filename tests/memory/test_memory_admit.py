"""Admission, the world-model test, on measured numbers: the same world tokens scored with and
without the note; a note of the world's own words admitted and an unrelated one refused by a model
that copies from context; the verdict on a random tiny model is the thresholds' on its numbers."""

from __future__ import annotations

import pytest
from memory_helpers import RULE, CopyLM, capital_stream, discount_stream

from dostream.memory.admit import Admission, Scorer, world_logprobs
from dostream.memory.retrieve import as_context
from dostream.memory.store import Note
from dostream.models import tiny_model
from dostream.render import Renderer

HELD = [discount_stream(i, who) for i, who in enumerate(["teacher", "nurse", "pilot"], start=1)]
OTHERS = [capital_stream(i) for i in range(3)]


def _note(text: str):
    return as_context([Note(0, text, "extractive", "active", None, 0.0, None, {})])


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_a_note_in_context_changes_only_the_scores_of_the_same_world_tokens(tok, chat):
    model, r = tiny_model(), Renderer(tok, chat_template=chat)
    without = world_logprobs(model, r, HELD)
    with_note = world_logprobs(model, r, HELD, _note(RULE))
    assert [len(a) for a in with_note] == [len(b) for b in without]
    # the world's tokens only: the user's turns (the first token of each stream aside), none of the agent's
    world = [sum(r.render(s).supervised("interventional")) for s in HELD]
    assert [len(b) for b in without] == world
    assert with_note != without


def test_a_copying_model_admits_the_worlds_words_and_refuses_unrelated_ones(tok):
    scorer = Scorer(CopyLM(len(tok)), Renderer(tok), Admission(min_gain=0.0, tolerance=0.05))
    same = scorer.test(RULE, HELD, OTHERS)
    assert same["admitted"], same["reason"]
    assert same["covered"]["delta"] > 0.1 and same["covered"]["n"] == 3 and same["covered"]["tokens"] > 30
    assert all(d > 0 for d in same["covered"]["per_stream"])
    unrelated = scorer.test("Bananas grow in warm wet places.", HELD, OTHERS)
    assert not unrelated["admitted"] and unrelated["covered"]["delta"] < 0
    assert "not above 0.0" in unrelated["reason"]
    # a note that helps where it claims but costs the others more than the tolerance is refused too
    strict = Scorer(CopyLM(len(tok)), Renderer(tok), Admission(min_gain=0.0, tolerance=0.0))
    hurt = strict.test(RULE, HELD, OTHERS)
    assert hurt["others"]["delta"] < 0 and not hurt["admitted"] and "fell" in hurt["reason"]
    # nothing held out to test it on: refused
    assert not scorer.test(RULE, [], OTHERS)["admitted"]


def test_the_verdict_on_a_random_tiny_model_is_the_thresholds_on_its_measured_numbers(tok):
    """A random tiny model does not copy, so the direction of Δ is noise; what is tested is that
    the numbers are measured (nonzero, per stream, recorded) and the verdict follows them."""
    scorer = Scorer(tiny_model(), Renderer(tok), Admission(min_gain=0.0, tolerance=0.05))
    rec = scorer.test(RULE, HELD, OTHERS)
    c, o = rec["covered"]["delta"], rec["others"]["delta"]
    assert c != 0 and o != 0 and rec["covered"]["streams"] == ["d1", "d2", "d3"]
    assert rec["admitted"] == (c > 0.0 and o >= -0.05)
    for gain in (c - 1e-3, c):  # just below the measured gain: admitted iff the others hold; at it: refused
        ok, _ = Admission(min_gain=gain, tolerance=abs(o) + 1e-3).judge(rec["covered"], rec["others"])
        assert ok == (gain < c)
