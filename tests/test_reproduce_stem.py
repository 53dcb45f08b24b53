"""`dostream reproduce stem --preset smoke` end to end as a subprocess: every method runs, the
report is complete, a rerun comes from the cache, and `dostream report` rebuilds it."""

import json
import time

import pytest
from conftest import run_cli

FIGURES = ("accuracy.png", "tokens.png", "stream_composition.png", "stream_matched.png", "skills.png")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("stem") / "run"
    t = time.perf_counter()
    proc = run_cli("reproduce", "stem", "--preset", "smoke", "--out", out, timeout=600)
    return out, proc, time.perf_counter() - t


def test_smoke_writes_a_complete_report(smoke):
    out, proc, seconds = smoke
    assert seconds < 180, f"the smoke preset took {seconds:.0f} s (budget: 3 minutes)"
    report = (out / "report.md").read_text()
    for fig in FIGURES:
        assert (out / "figures" / fig).stat().st_size > 1000, fig
        assert f"figures/{fig}" in report
    for heading in (
        "Held-out solve accuracy",
        "Stream-matched",
        "Token accounting",
        "The stream",
        "Wall time per stage",
        "Configuration",
    ):
        assert heading in report
    res = json.loads((out / "results.json").read_text())
    methods = {"base", "sft1", "rest", "grpo", "dapo", "oracle_sft", "observational", "interventional"}
    assert set(res["methods"]) == methods
    acc = res["seeds"]["0"]["accuracy"]
    for m in methods:
        a = acc[m]
        assert a["n"] == res["config"]["n_test"] and 0 <= a["wilson"][0] <= a["accuracy"] <= a["wilson"][1] <= 1
    stream = res["seeds"]["0"]["stream"]
    assert stream["wrong"] == res["config"]["n_wrong"]
    tokens = res["seeds"]["0"]["tokens"]
    # the two arms train on the same turns: same positions, fewer supervised in the interventional arm
    assert tokens["interventional"]["supervised_tokens"] < tokens["observational"]["supervised_tokens"]
    assert res["seeds"]["0"]["grpo"]["groups"] == res["config"]["grpo_groups"]


def test_rerun_uses_the_cache(smoke):
    out, _, _ = smoke
    proc = run_cli("reproduce", "stem", "--preset", "smoke", "--out", out, "--no-report", timeout=300)
    ran = [line for line in proc.stderr.splitlines() if line.endswith("] running")]
    assert not ran, f"stages ran again: {ran}"
    assert proc.stderr.count("] cached") >= 18


def test_report_command_rebuilds_and_other_config_is_refused(smoke):
    out, _, _ = smoke
    (out / "report.md").unlink()
    proc = run_cli("report", out)
    assert (out / "report.md").exists() and proc.stdout.strip().endswith("report.md")
    other = run_cli("reproduce", "stem", "--preset", "smoke", "--out", out, "--set", "n_test=5", check=False)
    assert other.returncode == 2 and "n_test" in other.stderr


def test_report_over_seeds(smoke, tmp_path):
    """With two seeds the table shows the mean and a t interval over seeds (here seed 1 is a copy
    of seed 0 with one answer flipped, so the numbers are known)."""
    import shutil

    out, _, _ = smoke
    two = tmp_path / "two"
    shutil.copytree(out, two)
    shutil.copytree(two / "seed-0", two / "seed-1")
    path = two / "seed-1" / "stages" / "interventional_eval" / "result.json"
    r = json.loads(path.read_text())
    r["value"]["correct"][0] = 1 - r["value"]["correct"][0]
    r["value"]["solved"] = sum(r["value"]["correct"])
    r["value"]["accuracy"] = r["value"]["solved"] / r["value"]["n"]
    path.write_text(json.dumps(r))
    run_cli("report", two)
    res = json.loads((two / "results.json").read_text())
    s = res["summary"]["interventional"]
    a0 = res["seeds"]["0"]["accuracy"]["interventional"]["accuracy"]
    a1 = res["seeds"]["1"]["accuracy"]["interventional"]["accuracy"]
    assert s["per_seed"] == [a0, a1] and s["mean"] == pytest.approx((a0 + a1) / 2)
    assert s["t_low"] < s["mean"] < s["t_high"]
    assert "mean over 2 seeds" in (two / "report.md").read_text()
