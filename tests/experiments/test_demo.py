"""`dostream demo`: its code path end to end on the tiny model (the real run uses smollm2)."""

import json

from conftest import run_cli

from dostream.experiments.demo import ARMS, PROBE_ASK, TRAIN_ASKS, DemoConfig, dialogues


def test_training_streams_are_wrong_answers_corrected_and_never_use_the_probe_question():
    streams = dialogues(DemoConfig(n_facts=6, dialogues_per_fact=3))
    assert len(streams) == 18
    probe = PROBE_ASK.split("{")[0]
    for s in streams:
        assert s.meta["lie"] and s.meta["corrected"]  # every Agent answer is wrong, every one corrected
        user = [seg.text for seg in s.segments if seg.author == "user"]
        assert not any(t.startswith(probe) for t in user), "the probe's phrasing is held out of training"
    assert PROBE_ASK not in TRAIN_ASKS


def test_demo_runs_end_to_end_and_reports_both_arms(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--model", "tiny", "--n-facts", "4", "--epochs", "1", "--batch-size", "4", "--out", out]
    proc = run_cli(*args, "--no-progress")
    listing = proc.stderr
    # The listing shows the rule: the Agent's turns are masked under interventional only.
    agent_lines = [line for line in listing.splitlines() if line.split()[2:3] == ["agent"]]
    assert agent_lines and all(line.split()[:2] == ["mask", "LOSS"] for line in agent_lines)
    assert "prefers its wrong claim" in proc.stdout and "interventional" in proc.stdout
    res = json.loads((out / "demo.json").read_text())
    assert set(res["models"]) == {"base", *ARMS}
    for m in res["models"].values():
        assert m["n"] == 4 and sum(m["answers"].values()) == 4 and 0 <= m["prefers_false"] <= 4
    tr = res["training"]
    assert tr["interventional"]["steps"] == tr["observational"]["steps"] == 2
    assert tr["interventional"]["tokens"] == tr["observational"]["tokens"]  # same rows, other labels
    assert tr["interventional"]["supervised_tokens"] < tr["observational"]["supervised_tokens"]
    # The two arms differ only in labels: same start, so different adapters only through the loss.
    assert res["models"]["interventional"]["records"] != res["models"]["observational"]["records"]
    # A rerun replaces the demo's own adapters (tested by the code path above on a fresh dir) but
    # never a directory that holds another run.
    (out / "interventional" / "config.json").write_text(json.dumps({"config": {"view": "observational"}}))
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2 and "holds another run" in proc.stderr
