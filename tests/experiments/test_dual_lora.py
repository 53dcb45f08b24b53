"""`dostream reproduce dual-lora`: the smoke preset end to end (every learner, two seeds, the
report), resuming from its stages, and the episodes-to-threshold count."""

import json

import pytest
from conftest import run_cli

from dostream.config import RunDirError
from dostream.experiments.dual_lora.report import episodes_to
from dostream.experiments.dual_lora.run import PRESETS, agent_config, resolve_preset, run
from dostream.learning.config import LEARNERS


def test_episodes_to_threshold_is_the_first_evaluation_that_reaches_it():
    evals = [{"after_episodes": a, "successes": k, "n": 4} for a, k in ((0, 1), (16, 1), (32, 2), (48, 4))]
    assert episodes_to(evals, 0.5) == 32 and episodes_to(evals, 0.25) == 0
    assert episodes_to(evals, 1.0) == 48 and episodes_to(evals[:3], 0.75) is None


def test_the_loops_get_the_experiment_s_settings():
    cfg = resolve_preset("quick", seeds=1)
    a = agent_config(cfg, "support-framed", 2)
    assert (a.env, a.seed, a.group_size, a.dual_rank, a.lr, a.episodes) == ("support-framed", 2, 4, 64, 1e-3, 64)
    assert a.dual_rank == 2 * a.lora_r  # each half has the one-loss learners' rank
    assert PRESETS["quick"].learners == list(LEARNERS)


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_smoke_preset_runs_every_learner_and_reports(tmp_path, capsys):
    out = tmp_path / "dl"
    run_cli("reproduce", "dual-lora", "--preset", "smoke", "--out", out)
    res = json.loads((out / "results.json").read_text())
    env = res["envs"]["support"]
    assert env["seeds"] == [0, 1] and list(env["learners"]) == list(LEARNERS)
    for name, lr in env["learners"].items():
        assert len(lr["curves"]) == 2 and all(len(c) == 8 for c in lr["curves"])
        assert [e[0] for e in lr["evals"][0]] == [0, 8]
        assert len(lr["episodes_to_threshold"]["per_seed"]) == 2
        assert lr["probe_act"]["values"], f"{name} has no rule probe"
    assert (out / "figures" / "support.png").stat().st_size > 10_000
    text = (out / "report.md").read_text()
    assert "## support (2 seeds)" in text and "dual (DAPO half + world half)" in text
    # each seed directory is an agent run with its own report and probe
    assert json.loads((out / "support" / "seed-1" / "config.json").read_text())["learners"] == list(LEARNERS)
    assert (out / "support" / "seed-1" / "probe.json").exists()
    # Rerunning resumes from the stages (in-process from here on: no new interpreter per check).
    run(PRESETS["smoke"], out, "smoke")
    assert "[loops-support-s0] cached" in capsys.readouterr().out
    from dostream.cli.report import cli_main as report_main

    (out / "report.md").unlink()
    assert report_main([str(out)]) == 0 and (out / "report.md").exists()
    with pytest.raises(RunDirError, match="different config"):
        run(resolve_preset("smoke", episodes=12), out)
