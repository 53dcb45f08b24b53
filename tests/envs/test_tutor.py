"""The tutoring environment: the fact bank, the held-out split, and the dialogue generator."""

import json
import random
from collections import Counter

from dostream.envs.tutor.env import (
    CONTEXT,
    FACTS,
    HELD_OUT_FACTS,
    TRAIN_FACTS,
    answer_stream,
    classify_follow_up,
    dialogue,
    fact_sets,
    generate_dialogues,
    prompt_stream,
)
from dostream.render import Renderer, encode_rows


def test_fact_bank_is_large_varied_and_well_formed():
    assert len(FACTS) >= 120
    assert len({f.topic for f in FACTS}) == len(FACTS), "topics must be unique (they name the probes)"
    assert len({f.true_claim for f in FACTS}) == len(FACTS)
    fields = Counter(f.field for f in FACTS)
    assert len(fields) >= 8 and min(fields.values()) >= 8
    for f in FACTS:
        assert f.true != f.false and f.true_claim != f.false_claim
        assert "*" not in f.true + f.false and "{}" in f.template
        # A near miss: the two claims differ only in the value, and each key names one side only.
        assert classify_follow_up(f.true_claim, f) == "truth", f
        assert classify_follow_up(f.false_claim, f) == "lie", f
        assert f.true_key.lower() not in f.false_key.lower() and f.false_key.lower() not in f.true_key.lower()


def test_held_out_split_is_disjoint_and_fixed():
    assert set(TRAIN_FACTS).isdisjoint(HELD_OUT_FACTS)
    assert set(TRAIN_FACTS) | set(HELD_OUT_FACTS) == set(FACTS)
    assert len(HELD_OUT_FACTS) == len(FACTS) // 4
    sets = fact_sets(33, 11, 22)
    assert [len(sets[k]) for k in ("seen", "lie_only", "held_out")] == [33, 11, 22]
    assert set(sets["seen"]) <= set(TRAIN_FACTS)
    assert set(sets["lie_only"]) | set(sets["held_out"]) <= set(HELD_OUT_FACTS)
    assert set(sets["lie_only"]).isdisjoint(sets["held_out"])
    assert fact_sets(33, 11, 22) == sets
    assert fact_sets(4, 2, 2)["seen"] == sets["seen"][:4], "smaller presets probe a prefix of the same order"


def test_generator_is_deterministic_and_balanced():
    sets = fact_sets(5, 2, 2)
    make = lambda seed: [
        s.to_json()
        for s in generate_dialogues(sets["seen"], 23, seed, p_lie=0.5, lie_only=sets["lie_only"], lie_only_per_fact=3)
    ]
    assert json.dumps(make(0)) == json.dumps(make(0))
    assert json.dumps(make(0)) != json.dumps(make(1))
    ds = make(0)
    assert len(ds) == 23 + 2 * 3
    seen = Counter(d["meta"]["topic"] for d in ds if d["meta"]["set"] == "seen")
    assert max(seen.values()) - min(seen.values()) <= 1, "round-robin: every fact as often as possible"
    assert len({d["id"] for d in ds}) == len(ds)


def test_authorship_lies_and_corrections():
    rng = random.Random(0)
    phrasings = set()
    for i in range(200):
        fact = FACTS[i % len(FACTS)]
        lie_only = i % 5 == 0
        s = dialogue(fact, rng, p_lie=0.5, p_tail=0.5, sid=str(i), lie_only=lie_only)
        by = lambda a: "".join(seg.text for seg in s.segments if seg.author == a)
        assert s.segments[0].author == "context" and s.segments[0].text == CONTEXT
        assert {seg.author for seg in s.segments} == {"context", "protocol", "user", "agent"}
        assert {seg.text for seg in s.segments if seg.author == "protocol"} <= {"User: ", "Agent: ", "\n"}
        # The world never states the false claim; the agent states it exactly when it lies.
        assert fact.false_claim not in by("user")
        assert (fact.false_claim in by("agent")) == s.meta["lie"]
        if lie_only:
            assert s.meta["lie"] and not s.meta["corrected"]
            assert fact.true_claim not in s.text, "a lie-only dialogue never shows the truth"
        elif s.meta["lie"]:
            assert s.meta["corrected"] and fact.true_claim in by("user")
        phrasings.add(s.segments[2].text.replace(fact.topic, "T").replace(fact.true_claim, "C"))
        assert s.text.endswith("\n") and all(seg.text for seg in s.segments)
    assert len(phrasings) >= 8, "user turns come in varied phrasings"


def test_views_mask_the_agent_only_in_the_interventional_arm(tok):
    from dostream.experiments.delusion.run import ARMS

    ds = generate_dialogues(FACTS[:3], 6, seed=0, p_lie=1.0)
    renderer = Renderer(tok)
    for arm, authors in ARMS.items():
        rows, stats = encode_rows(ds, renderer, authors)
        assert stats.supervised_by_author.get("context", 0) == 0
        assert ("agent" in stats.supervised_by_author) == (arm == "standard")
        assert stats.supervised_by_author["user"] == stats.tokens_by_author["user"]


def test_probe_streams():
    fact = FACTS[0]
    p = prompt_stream(fact.true_claim)
    assert p.text == CONTEXT + f"User: {fact.true_claim}\nAgent: "
    a = answer_stream(fact, fact.false_claim)
    assert a.segments[-1].author == "agent" and a.segments[-1].text == fact.false_claim
    assert a.text.endswith(f"User: Tell me about {fact.topic}.\nAgent: {fact.false_claim}")


def test_classify_follow_up():
    fact = next(f for f in FACTS if f.topic == "the laws of motion")
    assert classify_follow_up("Yes, it was Newton.", fact) == "truth"
    assert classify_follow_up("Not quite. Galileo did.\nUser: Newton", fact) == "lie", "only the agent's turn counts"
    assert classify_follow_up("Newton, not Galileo.", fact) == "neither"
    assert classify_follow_up("Thank you.", fact) == "neither"
    pi = next(f for f in FACTS if f.topic == "the value of pi")
    assert classify_follow_up("It is 3.141.", pi) == "neither", "a key matches whole words only"
