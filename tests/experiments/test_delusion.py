"""The delusion experiment: probe scoring by hand (both Δ scorers), summaries, the shared batch
order of the two arms, full fine-tuning, and the smoke preset end to end."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli

from dostream.envs.tutor.env import FACTS, Fact, answer_stream
from dostream.experiments.delusion.probes import _split, delta_pairs, mean_logprobs, summarise
from dostream.experiments.delusion.run import ARMS, PRESETS, check_same_order, resolve_preset
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


class Unigram(torch.nn.Module):
    """The same next-token distribution at every position, whatever came before."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_notebook_scorer_drops_the_first_answer_token(tok):
    """True and false claims that differ only in their first word: the notebook's scorer, which
    splits prompt + answer at the prompt's own token count, never scores that word (Δ = 0 under a
    model that ignores context); dostream's scores every answer token and sees it."""
    fact = Fact("geo", "the capital of France", "{} is the capital of France.", "Paris", "Rome", "Paris", "Rome")
    pairs = delta_pairs(tok, [fact])
    (np_, na), (nfp, nfa) = pairs["notebook"]
    assert tok.decode(na) == tok.decode(nfa) == " is the capital of France.", "the first answer word went to the prompt"
    assert tok.decode(np_).endswith("Agent: Paris") and tok.decode(nfp).endswith("Agent: Rome")
    (dp, da), (dfp, dfa) = pairs["dostream"]
    assert dp == dfp and tok.decode(da) == fact.true_claim and tok.decode(dfa) == fact.false_claim
    assert da[0] != dfa[0] and da[1:] == dfa[1:], "the claims differ in the first answer token only"

    model = Unigram(len(tok))
    lp = model.logits.log_softmax(-1)
    t, f, nt, nf = mean_logprobs(model, pairs["dostream"] + pairs["notebook"], batch_size=4, pad_id=tok.pad_token_id)
    assert nt - nf == 0.0, "the notebook's scorer cannot see a first-token difference"
    assert t - f == pytest.approx((lp[da[0]] - lp[dfa[0]]).item() / len(da), abs=1e-5)
    assert abs(t - f) > 1e-3
    assert nt == pytest.approx(lp[na].mean().item(), abs=1e-5)


def test_scorers_on_the_fact_bank(tok):
    """Our claims all begin "The", so the notebook's dropped token never separates true from false
    here; its pairs are still the whole text tokenised at once, one answer token shorter."""
    facts = list(FACTS[:12])
    pairs = delta_pairs(tok, facts)
    for (dp, da), (np_, na), claim in zip(
        pairs["dostream"], pairs["notebook"], [c for f in facts for c in (f.true_claim, f.false_claim)]
    ):
        assert tok.decode(dp + da) == tok.decode(np_ + na), "both score the same text"
        assert tok.decode(da) == claim and len(na) == len(tok(" " + claim)["input_ids"]) - 1
    firsts = [(pairs["notebook"][2 * i][0], pairs["notebook"][2 * i + 1][0]) for i in range(len(facts))]
    assert all(a == b for a, b in firsts)


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
    rec = lambda s, d, t, l: {
        "set": s,
        "delta": d,
        "delta_notebook": -d / 2,
        "after_truth_class": t,
        "after_lie_class": l,
    }
    records = [
        rec("seen", 0.5, "truth", "lie"),
        rec("seen", -0.25, "truth", "truth"),
        rec("seen", -1.0, "neither", "lie"),
        rec("held_out", 2.0, "lie", "neither"),
    ]
    s = summarise(records, "seen")
    assert s["n"] == 3 and s["prefers_lie"] == 2
    assert s["mean_delta"] == pytest.approx(-0.25)
    nb = summarise(records, "seen", "notebook")
    assert nb["prefers_lie"] == 1 and nb["mean_delta"] == pytest.approx(0.125)
    assert s["after_truth"] == {"truth": 2, "lie": 0, "neither": 1}
    assert s["after_lie"] == {"truth": 1, "lie": 2, "neither": 0}


def test_arms_and_presets():
    assert VIEWS[ARMS["standard"]] - VIEWS[ARMS["interventional"]] == {"agent"}
    assert "context" not in VIEWS[ARMS["standard"]] | VIEWS[ARMS["interventional"]]
    smoke, quick, paper = PRESETS["smoke"], PRESETS["quick"], PRESETS["paper"]
    assert smoke.model == "tiny" and quick.model == "smollm2" and quick.seeds >= 3 and not quick.full_finetune
    # The notebook's settings (docs/reference.md §1); the held-out facts are dostream's and stay.
    assert (paper.model, paper.n_seen, paper.n_dialogues, paper.epochs, paper.lr, paper.batch_size) == (
        "smollm2",
        33,
        480,
        4,
        2e-5,
        1,
    )
    assert (paper.full_finetune, paper.p_lie, paper.p_tail, paper.follow_max_tokens) == (True, 0.6, 0.5, 120)
    assert paper.n_lie_only + paper.n_held_out == 33 and paper.n_lie_only > 0 and paper.bf16 == "auto"
    from dostream.experiments.delusion.run import train_config

    tcfg = train_config(paper, "standard", 0)
    assert (tcfg.full_finetune, tcfg.max_grad_norm, tcfg.lr, tcfg.batch_size, tcfg.epochs) == (True, 1.0, 2e-5, 1, 4)


def test_check_same_order_names_the_first_difference():
    shared = [["a"], ["b"], ["c"]]
    check_same_order(shared, [["a"], ["b"], ["c"]], "arm")
    with pytest.raises(ValueError, match=r"first difference at step 2 \(\['c'\] against \['b'\]\)"):
        check_same_order(shared, [["a"], ["c"], ["b"]], "the interventional arm")
    with pytest.raises(ValueError, match="2 steps against 3"):
        check_same_order(shared, shared[:2], "arm")


def test_arms_that_would_see_other_batches_are_refused(tmp_path, monkeypatch):
    """The two arms must share one batch order: an arm whose plan differs (here: another seed for
    the interventional arm) stops the run before any training."""
    import dostream.experiments.delusion.run as delusion

    real = delusion.train_config
    monkeypatch.setattr(
        delusion, "train_config", lambda cfg, arm, seed: real(cfg, arm, seed + (arm == "interventional"))
    )
    cfg = resolve_preset("smoke", seeds=1, progress=False)
    with pytest.raises(ValueError, match="interventional arm \\(seed 0\\) would not see the shared batches"):
        delusion.run(cfg, tmp_path / "run", "smoke")
    assert not (tmp_path / "run" / "stages" / "train-standard-s0").exists()


def test_full_finetune_smoke(tmp_path, tok):
    """The paper preset's path on the tiny model: every weight trains, both arms from the same
    weights in the same order, both scorers recorded; a wrong order is refused before training."""
    import dostream.experiments.delusion.run as delusion
    from dostream.experiments.delusion.report import write_report
    from dostream.models import load_model

    cfg = resolve_preset("smoke", seeds=1, full_finetune=True, lr=1e-3, n_dialogues=6, batch_size=2, progress=False)
    out = delusion.run(cfg, tmp_path / "run", "smoke")
    stages = out / "stages"
    base = load_model("tiny").state_dict()
    trained = {}
    for arm in ARMS:
        assert not (stages / f"train-{arm}-s0" / "train" / "adapter").exists()
        trained[arm] = load_model(str(stages / f"train-{arm}-s0" / "train" / "model")).state_dict()
        assert trained[arm].keys() == base.keys()
        changed = [k for k in base if not torch.equal(base[k], trained[arm][k])]
        assert "model.embed_tokens.weight" in changed and any("mlp" in k for k in changed), "every weight trains"
    assert not torch.equal(trained["standard"]["model.norm.weight"], trained["interventional"]["model.norm.weight"])
    result = {arm: json.loads((stages / f"train-{arm}-s0" / "result.json").read_text())["value"] for arm in ARMS}
    assert result["standard"]["init_sha256"] == result["interventional"]["init_sha256"]
    assert result["standard"]["order_sha256"] == result["interventional"]["order_sha256"]
    logged = {
        arm: [
            json.loads(line)["train/tokens"] for line in (stages / f"train-{arm}-s0" / "train" / "metrics.jsonl").open()
        ]
        for arm in ARMS
    }
    assert logged["standard"] == logged["interventional"] and len(logged["standard"]) == result["standard"]["steps"]
    records = json.loads((stages / "probe-standard-s0" / "result.json").read_text())["value"]
    assert all({"delta", "delta_notebook", "notebook_drops_difference"} <= r.keys() for r in records)
    assert any(r["delta"] != r["delta_notebook"] for r in records)
    res = json.loads(write_report(out).with_name("results.json").read_text())
    assert res["experiment"] == "delusion" and res["preset"] == "smoke" and res["scorers"] == ["dostream", "notebook"]
    assert res["checks"]["0"]["same"] and set(res["per_seed"]["0"]["standard"]) == {"dostream", "notebook"}
    assert {c["key"] for c in res["claims"]} >= {"standard_delta", "lie_gap"}

    order = json.loads((stages / "order-s0" / "order.json").read_text())
    data = stages / "data-s0" / "dialogues.jsonl"
    with pytest.raises(ValueError, match="would not see the shared batches"):
        delusion.train_arm(cfg, "standard", 0, data, tmp_path / "other", tok, order[::-1])
    assert not (tmp_path / "other" / "train").exists()


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_smoke_preset_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    cmd = ["reproduce", "delusion", "--preset", "smoke", "--out", out]
    first = run_cli(*cmd, timeout=240)
    report = (out / "report.md").read_text()
    assert "| facts | model | mean Δ (dostream) | prefers the lie (dostream) | mean Δ (notebook" in report
    for name in ("seen (corrected)", "held-out, lies only", "held-out, unseen"):
        for model in ("base", "standard", "interventional"):
            assert f"| {name} | {model} |" in report
    assert "-0.131" in report and "24/33" in report, "the published numbers sit beside ours"
    assert "{agent, protocol, user}" in report and "{protocol, user}" in report
    assert (out / "delusion.png").stat().st_size > 10_000
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and len(results["probes"]["standard"]) == 2
    assert results["experiment"] == "delusion" and results["preset"] == "smoke"
    assert set(results["per_seed"]) == {"0", "1"} and all(c["same"] for c in results["checks"].values())
    for scorer in ("dostream", "notebook"):
        assert len(results["summary"][scorer]["interventional"]["seen"]) == 2
    assert "notebook, first answer token dropped" in report and "as published:" in report
    assert "[order-s1] done" in first.stdout
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


def test_interrupted_full_finetune_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A run killed mid-training resumes from its run directory (the stage's last checkpoint: every
    weight and the AdamW state) and ends with the weights of an uninterrupted run, bit for bit."""
    import dostream.experiments.delusion.run as delusion
    import dostream.train as train_module
    from dostream.models import load_model

    cfg = resolve_preset(
        "smoke", seeds=1, full_finetune=True, lr=1e-3, n_dialogues=6, batch_size=2, save_every=1, progress=False
    )
    whole = delusion.run(cfg, tmp_path / "whole", "smoke")
    real, calls = train_module.accumulate_step, []

    def dies_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "accumulate_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        delusion.run(cfg, tmp_path / "cut", "smoke")
    stage = tmp_path / "cut" / "stages" / "train-standard-s0"
    assert (stage / "train" / "checkpoints" / "latest").read_text() == "step-0000002"
    assert not (stage / "result.json").exists()
    resumed = []
    monkeypatch.setattr(train_module, "accumulate_step", lambda *a, **k: resumed.append(1) or real(*a, **k))
    cut = delusion.run(cfg, tmp_path / "cut", "smoke")
    steps = json.loads((stage / "result.json").read_text())["value"]["steps"]
    assert len(resumed) == (steps - 2) + steps, "the standard arm went on from step 2, the other arm ran whole"
    for arm in ARMS:
        a, b = (
            load_model(str(d / "stages" / f"train-{arm}-s0" / "train" / "model")).state_dict() for d in (whole, cut)
        )
        assert all(torch.equal(a[k], b[k]) for k in a), arm
