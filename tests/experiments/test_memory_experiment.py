"""`dostream reproduce memory`: the arms' wiring, the agent-trusting control (only inside its
context; the store's refusal stays the default), the discount environment, and the smoke preset
end to end (slow)."""

import json

import pytest
from conftest import run_cli

from dostream.envs.discount import HELDOUT, TRAIN, Customer, DiscountEnv, items, verdict
from dostream.envs.registry import env_spec
from dostream.experiments.memory.run import (
    ARMS,
    PRESETS,
    TRUSTING,
    ExperimentAgent,
    arm_config,
    resolve_preset,
    run,
)
from dostream.memory import EVIDENCE_AUTHORS, Cite, EvidenceError, Memory
from dostream.memory.distill import cases
from dostream.stream import Segment, Stream


def _claim_stream() -> Stream:
    return Stream(
        "d0",
        [
            Segment("user", "I am a nurse. Do I qualify for the discount?\n"),
            Segment("agent", "Yes, everyone qualifies for the discount.\n"),
            Segment("user", "No, nurses do not qualify for the discount.\n"),
        ],
    )


def test_arms_get_their_learner_and_memory():
    cfg = resolve_preset("quick", seeds=1)
    got = {a: (c.learner, c.memory) for a in ARMS for c in [arm_config(cfg, "discount", 2, a)]}
    assert got == {
        "none": ("none", False),
        "memory": ("none", True),
        "weights": ("interventional", False),
        "both": ("interventional", True),
        "consolidated": ("none", False),  # not a loop: both's end, consolidated
        "trusting": ("none", True),
    }
    c = arm_config(cfg, "discount", 2, "both")
    assert (c.env, c.seed, c.group_size, c.episodes, c.lr) == ("discount", 2, 1, 16, 1e-3)
    with pytest.raises(ValueError, match="consolidated arm"):
        resolve_preset("smoke", arms=["none", "consolidated"])
    with pytest.raises(ValueError, match="not"):
        resolve_preset("smoke", envs=["nowhere"])


def test_the_store_refuses_agent_evidence_by_default_and_after_the_trusting_control(tmp_path):
    s = _claim_stream()
    mem = Memory.open_dir(tmp_path / "m")
    with pytest.raises(EvidenceError, match="author 'agent' cannot be evidence"):
        mem.add("Everyone qualifies.", "extractive", evidence=[Cite(s, 1)])
    assert 1 not in [c.segment for c in cases(s)]  # the world's statements only (2: the correction)
    trusting = Memory.open_dir(tmp_path / "t", evidence_authors=TRUSTING)
    nid = trusting.add("Everyone qualifies.", "extractive", evidence=[Cite(s, 1)])
    assert 1 in [c.segment for c in cases(s, authors=TRUSTING)]  # the agent's claim is a case too
    assert trusting.note(nid).evidence[0].author == "agent"
    trusting.close()
    assert "agent" not in EVIDENCE_AUTHORS  # the control changed nothing shared
    with pytest.raises(EvidenceError, match="author 'agent' cannot be evidence"):
        mem.add("Everyone qualifies, again.", "extractive", evidence=[Cite(s, 1)])
    assert 1 not in [c.segment for c in cases(s)] and 2 in [c.segment for c in cases(s)]
    with pytest.raises(EvidenceError):
        Memory.open_dir(tmp_path / "t").add("Still refused.", "extractive", evidence=[Cite(s, 1)])
    mem.close()


def test_discount_world_states_cases_and_held_out_customers_are_new():
    env = DiscountEnv()
    env.reset(Customer("a veteran", "veterans", True))
    r = env.step("Yes, you do.\n")
    assert r.info["success"] and r.segments[-1].text == "Yes, veterans qualify for the discount.\n"
    env.reset(Customer("a farmer", "farmers", False))
    r = env.step("Yes")
    assert not r.info["success"] and [s.author for s in r.segments] == ["protocol", "protocol", "user"]
    assert verdict("  no.") is False and verdict("Maybe") is None
    assert not {c.who for c in TRAIN} & {c.who for c in HELDOUT}
    assert items("train", 5, 0) == items("train", 5, 0) and items("heldout", 40, 1)[0] in HELDOUT
    assert env_spec("discount", 0).items("control", 3, 0)[0] in HELDOUT


def test_arms_wiring_on_a_few_episodes(tmp_path, monkeypatch):
    """Every arm, one seed, two episodes on the tiny model (each model loaded once): the stages,
    the loops' memories and learners, the consolidation stage and the report."""
    import functools

    import dostream.models

    for name in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(dostream.models, name, functools.lru_cache(getattr(dostream.models, name)))
    cfg = resolve_preset("smoke", seeds=1, episodes=2, eval_every=2, eval_n=1, max_new_tokens=2)
    out = run(cfg, tmp_path / "m", "smoke")
    seed = out / "discount" / "seed-0"
    for arm in ("memory", "both", "trusting"):
        assert (seed / arm / "memory" / "memory.sqlite").exists(), arm
    for arm in ("none", "weights"):
        assert not (seed / arm / "memory").exists(), arm
    for arm in ARMS:
        assert (out / "stages" / f"discount-s0-{arm}" / "result.json").exists(), arm
    stem = json.loads((out / "stages" / "discount-s0-stem" / "result.json").read_text())["value"]
    assert stem["problems"] == 2 and {"base", "weights", "both"} <= set(stem["scores"])  # interference
    both = json.loads((out / "stages" / "discount-s0-both" / "result.json").read_text())["value"]
    assert len(both["successes"]) == 2 and [u["after"] for u in both["updates"]] == []  # 2 episodes: no update
    assert json.loads((seed / "weights" / "config.json").read_text())["config"]["learner"] == "interventional"
    from dostream.experiments.memory.report import write_report

    text = write_report(out).read_text()
    assert "| trusting |" in text and "trusting − memory" in text and "Interference on the STEM test set" in text
    assert ExperimentAgent.distill is not None and PRESETS["quick"].seeds == 3


@pytest.mark.slow  # ~40 s on 2 cores: `make test-slow`
def test_smoke_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "mem"
    run_cli("reproduce", "memory", "--preset", "smoke", "--out", out)
    res = json.loads((out / "results.json").read_text())
    arms = res["envs"]["discount"]
    interference = arms.pop("stem_interference")
    assert set(arms) == set(ARMS) and all(a["seeds"] == 2 for a in arms.values())
    assert len(interference["base"]) == 2 and len(interference["delta"]["weights"]["values"]) == 2
    assert arms["weights"]["updates_accepted"] and list(arms["none"]["curve"]) == ["0", "4"]
    assert "## discount" in (out / "report.md").read_text()
    run(PRESETS["smoke"], out, "smoke")
    assert "[discount-s0-none] cached" in capsys.readouterr().out
