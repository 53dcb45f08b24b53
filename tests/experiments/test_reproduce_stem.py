"""`dostream reproduce stem --preset smoke` end to end as a subprocess: every method runs, the
report is complete, a rerun comes from the cache, and `dostream report` rebuilds it; the three
evaluation protocols (`single`, `paper`, `retry`) against hand-computed values."""

import json
import shutil
import time

import pytest
from conftest import run_cli

FIGURES = (
    "accuracy.png",
    "protocols.png",
    "tokens.png",
    "stream_composition.png",
    "stream_matched.png",
    "skills.png",
)
METHODS = ("base", "sft1", "rest", "grpo", "dapo", "oracle_sft", "observational", "interventional")


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
        "Protocol `single`",
        "Protocol `paper`",
        "Protocol `retry`",
        "The paper's claims under each protocol",
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
    assert res["protocols_missing"] == {}
    for name in ("single", "paper", "retry"):
        for m in methods:
            a = res["protocols"][name][m]
            assert a["n"] == res["config"]["n_test"] and a["wilson"][0] <= a["accuracy"] <= a["wilson"][1]
            assert a["accuracy"] == a["solved"] / a["n"]
        assert {"interventional vs observational", "interventional vs oracle_sft", "interventional vs rest"} <= set(
            res["protocol_tests"][name]
        )
    # which arms get a second attempt (the smoke model is wrong everywhere, so each wrong item gets one)
    second = {
        n: {m: a["second_attempts"] for m, a in res["seeds"]["0"]["protocols"][n].items()} for n in res["protocols"]
    }
    wrong = {m: acc[m]["n"] - acc[m]["solved"] for m in methods}
    assert set(second["single"].values()) == {0}
    assert second["paper"] == {
        m: wrong["sft1"] if m in ("interventional", "observational", "oracle_sft") else 0 for m in methods
    }
    assert second["retry"] == wrong


def test_rerun_uses_the_cache(smoke):
    out, _, _ = smoke
    proc = run_cli("reproduce", "stem", "--preset", "smoke", "--out", out, "--no-report", timeout=300)
    ran = [line for line in proc.stderr.splitlines() if line.endswith("] running")]
    assert not ran, f"stages ran again: {ran}"
    assert proc.stderr.count("] cached") >= 25  # 18 stages + base_retry + one <method>_retry per method


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
    single = res["protocols"]["single"]["interventional"]
    assert single["per_seed"] == [a0, a1] and single["mean"] == pytest.approx(s["mean"])
    assert single["solved"] == sum(res["seeds"][k]["accuracy"]["interventional"]["solved"] for k in ("0", "1"))
    # seed 1's flipped item was wrong and is now right: no second attempt for it under `retry`
    r0, r1 = (res["seeds"][k]["protocols"]["retry"]["interventional"] for k in ("0", "1"))
    assert r1["second_attempts"] == r0["second_attempts"] - 1
    assert set(res["protocol_tests"]["paper"]["interventional vs rest"]) == {"0", "1"}


# -- the evaluation protocols ---------------------------------------------------------------


def test_mcnemar_exact_by_hand():
    from dostream.stats import mcnemar

    # 9 items solved by a only, 0 by b only: p = 2 * (1/2)^9
    t = mcnemar([True] * 9 + [False, True], [False] * 9 + [False, True])
    assert (t["only_a"], t["only_b"]) == (9, 0) and t["p_value"] == pytest.approx(2 / 512)
    # 3 vs 1: p = 2 * (C(4,0) + C(4,1)) / 2^4 = 0.625
    t = mcnemar([1, 1, 1, 0, 1], [0, 0, 0, 1, 1])
    assert (t["only_a"], t["only_b"], t["p_value"]) == (3, 1, pytest.approx(0.625))
    # 2 vs 6: p = 2 * (1 + 8 + 28) / 256
    t = mcnemar([1, 1] + [0] * 6, [0, 0] + [1] * 6)
    assert t["p_value"] == pytest.approx(74 / 256)
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0
    with pytest.raises(ValueError, match="paired"):
        mcnemar([1], [1, 0])


def _value(ids, correct):
    return {"value": {"ids": list(ids), "correct": list(correct)}}


def test_protocols_by_hand():
    """Five items; every stage's answers chosen so that each rule gives a different vector."""
    from dostream.config import RunDirError
    from dostream.experiments.stem.results import protocol_answers

    q = [f"q{i}" for i in range(5)]
    st = {
        "base_eval": _value(q, [0, 0, 0, 0, 0]),
        "base_retry": _value(q, [0, 1, 0, 0, 0]),
        "sft1_eval": _value(q, [1, 0, 0, 1, 0]),
        "interventional_eval": _value(q, [0, 0, 1, 0, 0]),
        "interventional_retry": _value(["q0", "q1", "q3", "q4"], [0, 0, 1, 1]),
        "observational_eval": _value(q, [1, 0, 0, 0, 0]),
        "oracle_sft_eval": _value(q, [0, 1, 1, 0, 0]),
        "oracle_sft_retry": _value(["q0", "q3", "q4"], [1, 0, 0]),
        "repair": {
            "value": {
                "ids": ["q1", "q2", "q4"],
                "n": 3,
                "arms": {
                    "sft1": {"ids": ["q1", "q2", "q4"], "correct": [0, 0, 1]},
                    "interventional": {"ids": ["q1", "q2", "q4"], "correct": [1, 0, 0]},
                    "observational": {"ids": ["q1", "q2", "q4"], "correct": [0, 1, 1]},
                    "oracle_sft": {"ids": ["q1", "q2", "q4"], "correct": [0, 0, 1]},
                },
            }
        },
    }
    got, missing = protocol_answers(st)
    vec = lambda name, m: [int(c) for c in got[name][m]["correct"]]
    assert vec("single", "interventional") == [0, 0, 1, 0, 0]
    # paper: SFT-1's correct first attempts (q0, q3) + the arm's repairs of the others (q1)
    assert vec("paper", "interventional") == [1, 1, 0, 1, 0]
    assert vec("paper", "observational") == [1, 0, 1, 1, 1]
    # SFT + oracle corrections answers again from the plain prompt: its own single answers on q1, q2, q4
    assert vec("paper", "oracle_sft") == [1, 1, 1, 1, 0]
    assert vec("paper", "sft1") == vec("single", "sft1") and vec("paper", "base") == vec("single", "base")
    assert got["paper"]["interventional"]["second"] == ["q1", "q2", "q4"]
    # retry: the arm's own first attempt, else its own second attempt
    assert vec("retry", "interventional") == [0, 0, 1, 1, 1]
    assert vec("retry", "oracle_sft") == [1, 1, 1, 0, 0]
    assert vec("retry", "sft1") == [1, 0, 0, 1, 1]  # SFT-1's second attempts are the repair stage's sft1 arm
    assert vec("retry", "base") == [0, 1, 0, 0, 0]
    assert missing == {"retry": ["observational_retry"]} and "observational" not in got["retry"]
    del st["repair"]
    _, missing = protocol_answers(st)
    assert missing == {"paper": ["repair"], "retry": ["observational_retry", "repair"]}
    st["interventional_retry"] = _value(["q0", "q1", "q3"], [0, 0, 1])  # q4 has no second attempt
    with pytest.raises(RunDirError, match="retry/interventional.*q4"):
        protocol_answers(st)


def _edit(run, stage, fn):
    path = run / "seed-0" / "stages" / stage / "result.json"
    r = json.loads(path.read_text())
    fn(r["value"])
    path.write_text(json.dumps(r))


def _set(correct):
    def fn(v):
        v["correct"] = list(correct)
        v["solved"] = sum(correct)
        v["accuracy"] = v["solved"] / len(correct)

    return fn


def test_protocols_follow_the_stage_files(smoke, tmp_path):
    """The smoke run's stage files with known answers written in (the tiny model solves nothing):
    the report's protocols and McNemar tests equal the values computed here by hand."""
    from scipy.stats import binomtest

    out, _, _ = smoke
    run = tmp_path / "run"
    shutil.copytree(out, run)
    n = json.loads((out / "config.json").read_text())["config"]["n_test"]
    assert n == 8
    sft1 = [1, 0, 1, 0, 0, 0, 0, 0]
    _edit(run, "sft1_eval", _set(sft1))
    _edit(run, "oracle_sft_eval", _set([0, 0, 0, 1, 0, 0, 0, 1]))
    _edit(run, "rest_eval", _set([0, 1, 0, 0, 0, 0, 0, 0]))
    _edit(run, "rest_retry", _set([0, 0, 1, 0, 0, 0, 0, 1]))  # the smoke run retried all 8: only 7 count now
    rep_int, rep_obs = [1, 1, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0]

    def repair(v):
        assert v["n"] == n  # every smoke first attempt was wrong, so every item has a repair
        v["arms"]["interventional"]["correct"] = rep_int
        v["arms"]["observational"]["correct"] = rep_obs
        v["arms"]["sft1"]["correct"] = [0] * 7 + [1]

    _edit(run, "repair", repair)
    run_cli("report", run)
    res = json.loads((run / "results.json").read_text())
    prot = res["seeds"]["0"]["protocols"]
    solved = lambda name, m: prot[name][m]["solved"]
    assert solved("single", "sft1") == solved("paper", "sft1") == 2
    # paper, interventional: SFT-1's 2 correct first attempts + its repairs of the 6 others (items 1 and 3;
    # its "repair" of item 0, which SFT-1 got right, does not count)
    assert prot["paper"]["interventional"]["correct"] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert solved("paper", "interventional") == 2 + sum(r for r, s in zip(rep_int, sft1) if not s) == 4
    assert solved("paper", "observational") == 5
    assert prot["paper"]["oracle_sft"]["correct"] == [1, 0, 1, 1, 0, 0, 0, 1]
    assert prot["retry"]["rest"]["correct"] == [0, 1, 1, 0, 0, 0, 0, 1]
    assert prot["retry"]["sft1"]["correct"] == [1, 0, 1, 0, 0, 0, 0, 1]
    for m in METHODS:
        assert solved("retry", m) >= solved("single", m)
        assert res["protocols"]["paper"][m]["solved"] == solved("paper", m)  # one seed: pooled = seed 0
    # McNemar: interventional vs observational under paper, items 1 and 3 vs items 4, 5, 6
    t = res["protocol_tests"]["paper"]["interventional vs observational"]["0"]
    assert (t["only_a"], t["only_b"]) == (2, 3) and t["p_value"] == pytest.approx(1.0)
    # interventional (items 0-3) vs ReST single-shot (item 1): 3 vs 0, p = 2/8
    t = res["protocol_tests"]["paper"]["interventional vs rest"]["0"]
    assert (t["only_a"], t["only_b"], t["p_value"]) == (3, 0, pytest.approx(0.25))
    for name in ("single", "paper", "retry"):
        for pair, by_seed in res["protocol_tests"][name].items():
            a, b = (prot[name][m]["correct"] for m in pair.split(" vs "))
            only_a = sum(x and not y for x, y in zip(a, b))
            only_b = sum(y and not x for x, y in zip(a, b))
            t = by_seed["0"]
            assert (t["only_a"], t["only_b"]) == (only_a, only_b), (name, pair)
            want = binomtest(min(only_a, only_b), only_a + only_b).pvalue if only_a + only_b else 1.0
            assert t["p_value"] == pytest.approx(want), (name, pair)
    claims = {(c["a"], c["b"]): c for c in res["claims"]["paper"]}
    assert claims[("interventional", "rest")]["direction"] == "same"  # 4/8 vs 1/8; the paper: 85 vs 84
    assert claims[("interventional", "observational")]["direction"] == "opposite"  # 4/8 vs 5/8
    assert claims[("sft1", "base")]["direction"] == "same"
    report = (run / "report.md").read_text()
    assert "| Interventional stream | 6 | 50.0% [21.5, 78.5] (4/8) | 85.0% |" in report


def test_second_attempts_replay_the_first_as_a_training_row(smoke, tok):
    """Each second attempt's context is the first attempt's episode as a stream row has it: the same
    segments (the sampled ids kept), the verdict and the header, rendered to a prefix of the row."""
    from dostream.methods.stream_agents import arm_rows
    from dostream.render import Renderer
    from dostream.stream import Stream, read_streams

    out, _, _ = smoke
    stages = out / "seed-0" / "stages"
    pairs = [(f"{m}_eval", f"{m}_retry") for m in METHODS if m != "sft1"]
    pairs += [("sft1_eval", f"repair/{m}") for m in ("sft1", "oracle_sft", "observational", "interventional")]
    renderer = Renderer(tok, add_eos=False)
    checked = 0
    for first_stage, second_stage in pairs:
        first = {s.id: s for s in read_streams(stages / first_stage / "attempts.jsonl")}
        for r in read_streams(stages / second_stage / "attempts.jsonl"):
            e = first[r.id]
            assert not e.meta["first_correct"]
            k = next(i for i, s in enumerate(e.segments) if s.author == "oracle")  # the row's correction
            assert [s.author for s in e.segments[:k]][-3:] == ["agent", "verifier", "protocol"]
            assert r.segments[:k] == e.segments[:k], (second_stage, r.id)
            assert r.segments[k].author == "agent" and r.segments[k].token_ids, "no second attempt"
            assert r.meta["attempt"] == 2
            row = arm_rows([e], tok, "interventional")[0][0]["input_ids"]
            prompt = renderer.prompt_ids(Stream(r.id, r.segments[:k]))
            assert row[: len(prompt)] == prompt, (second_stage, r.id)
            checked += 1
    assert checked >= len(pairs) * 4


def test_run_directory_without_protocol_stages(smoke, tmp_path):
    """A run directory written before the retry stages existed: the report says what is missing and
    how to get it; rerunning the command runs only those stages and gives the same numbers."""
    out, _, _ = smoke
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for d in (old / "seed-0" / "stages").glob("*_retry"):
        shutil.rmtree(d)
    proc = run_cli("report", old)
    assert "protocol retry lacks stages base_retry" in proc.stderr and "rerun" in proc.stderr
    res = json.loads((old / "results.json").read_text())
    assert "interventional_retry" in res["protocols_missing"]["retry"]["0"]
    assert set(res["protocols"]["paper"]) == set(METHODS)  # `paper` needs no new stage
    assert "Protocol `retry` is incomplete" in (old / "report.md").read_text()
    proc = run_cli("reproduce", "stem", "--preset", "smoke", "--out", old, timeout=300)
    ran = sorted(line.split("[")[1].split("]")[0] for line in proc.stderr.splitlines() if line.endswith("] running"))
    assert ran == sorted(f"{m}_retry" for m in METHODS if m != "sft1")  # SFT-1's: the repair stage
    new = json.loads((old / "results.json").read_text())
    want = json.loads((out / "results.json").read_text())
    assert new["protocols_missing"] == {}
    assert new["protocols"] == want["protocols"] and new["seeds"]["0"]["protocols"] == want["seeds"]["0"]["protocols"]
