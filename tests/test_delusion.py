"""The delusion experiment: probe scoring by hand, summaries, and the smoke preset end to end."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli

from dostream.envs.tutor.env import FACTS, answer_stream
from dostream.experiments.delusion.run import ARMS, PRESETS, _split, mean_logprobs, summarise
from dostream.stream import VIEWS


class Bigram(torch.nn.Module):
    """p(next | current) from a fixed table: log-probabilities anyone can compute by hand."""

    def __init__(self, table):
        super().__init__()
        self.logits = torch.tensor(table).log()

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits[input_ids])


def test_mean_logprob_and_delta_by_hand():
    model = Bigram([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    # prompt [0], "true" continuation [1, 1]: (log .25 + log .8) / 2
    # prompt [0, 2], "false" continuation [2]: log .6 (rows of different lengths share a padded batch)
    got = mean_logprobs(model, [([0], [1, 1]), ([0, 2], [2])], batch_size=2, pad_id=0)
    assert got[0] == pytest.approx((math.log(0.25) + math.log(0.8)) / 2, abs=1e-6)
    assert got[1] == pytest.approx(math.log(0.6), abs=1e-6)
    assert got[0] - got[1] == pytest.approx(-0.8047190 - (-0.5108256), abs=1e-6)  # Δ = -0.294: prefers "false"
    assert mean_logprobs(model, [([0, 2], [2])], batch_size=1) == pytest.approx(got[1:], abs=1e-6)


def test_fast_scoring_path_matches_full_logits(tok):
    """With a real model, only the positions that predict the answer go through the head."""
    from dostream.models import tiny_model
    from dostream.render import Renderer

    model = tiny_model(1).eval()
    renderer = Renderer(tok, add_eos=False)
    pairs = [_split(renderer.render(answer_stream(f, c))) for f in FACTS[:3] for c in (f.true_claim, f.false_claim)]
    assert all(len(c) >= 5 for _, c in pairs)
    fast = mean_logprobs(model, pairs, batch_size=4, pad_id=tok.pad_token_id)
    for (p, c), value in zip(pairs, fast):
        with torch.no_grad():
            logp = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
        ref = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c)) / len(c)
        assert value == pytest.approx(ref, abs=1e-4)


def test_summarise_counts():
    rec = lambda s, d, t, l: {"set": s, "delta": d, "after_truth_class": t, "after_lie_class": l}
    records = [
        rec("seen", 0.5, "truth", "lie"),
        rec("seen", -0.25, "truth", "truth"),
        rec("seen", -1.0, "neither", "lie"),
        rec("held_out", 2.0, "lie", "neither"),
    ]
    s = summarise(records, "seen")
    assert s["n"] == 3 and s["prefers_lie"] == 2
    assert s["mean_delta"] == pytest.approx(-0.25)
    assert s["after_truth"] == {"truth": 2, "lie": 0, "neither": 1}
    assert s["after_lie"] == {"truth": 1, "lie": 2, "neither": 0}


def test_arms_and_presets():
    assert VIEWS[ARMS["standard"]] - VIEWS[ARMS["interventional"]] == {"agent"}
    assert "context" not in VIEWS[ARMS["standard"]] | VIEWS[ARMS["interventional"]]
    smoke, quick, paper = PRESETS["smoke"], PRESETS["quick"], PRESETS["paper"]
    assert smoke.model == "tiny" and quick.model == "smollm2" and quick.seeds >= 3 and not quick.full_finetune
    assert (paper.n_dialogues, paper.epochs, paper.lr, paper.p_lie, paper.full_finetune) == (480, 4, 2e-5, 0.5, True)


def test_smoke_preset_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    cmd = ["reproduce", "delusion", "--preset", "smoke", "--out", out]
    first = run_cli(*cmd, timeout=240)
    report = (out / "report.md").read_text()
    assert "| facts | model | mean Δ | prefers the lie |" in report
    for name in ("seen (corrected)", "held-out, lies only", "held-out, unseen"):
        for model in ("base", "standard", "interventional"):
            assert f"| {name} | {model} |" in report
    assert "-0.131" in report and "24/33" in report, "the published numbers sit beside ours"
    assert "{agent, protocol, user}" in report and "{protocol, user}" in report
    assert (out / "delusion.png").stat().st_size > 10_000
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and len(results["probes"]["standard"]) == 2
    assert "[train-standard-s1] done" in first.stdout

    again = run_cli(*cmd, timeout=120)
    assert "running" not in again.stdout, "a rerun resumes: every stage is cached"
    for stage in ("data-s0", "probe-base", "train-interventional-s1", "probe-standard-s0"):
        assert f"[{stage}] cached" in again.stdout
    assert (out / "report.md").read_text() == report

    other = run_cli(*cmd, "--lr", "0.5", check=False, timeout=120)
    assert other.returncode == 2 and "different config" in other.stderr and "lr" in other.stderr
    (out / "report.md").unlink()
    run_cli("reproduce", "delusion", "--report-only", "--out", out, timeout=120)
    assert (out / "report.md").read_text() == report
    assert json.loads((out / "config.json").read_text())["experiment"] == "delusion"
    (out / "report.md").unlink()
    run_cli("report", out, timeout=120)  # `dostream report` rebuilds any run's report
    assert (out / "report.md").read_text() == report
