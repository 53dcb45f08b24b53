"""Exact causal accounting (dostream.theory): golden posteriors, delusion, the prediction lemma."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from fractions import Fraction as F

import numpy as np
import pytest

from dostream.theory import (
    EXAMPLE,
    HypothesisClass,
    TheoryConfig,
    conditional_mean,
    delusion_model,
    outcome_predictive,
    posterior,
    posterior_path,
    prediction_lemma,
    random_joint,
    sampled_mse,
    simulate_delusion,
)

# ---------------------------------------------------------------- 1. Bayes under intervention
#
# EXAMPLE, by hand. Prior 1/2, 1/2. P(a=1 | p0) = 1/4, P(a=1 | p1) = 3/4.
# P(o=1 | p0, a=1) = 1/3, P(o=1 | p1, a=1) = 2/3; under a=0 both programs give o=1 with 1/2.
#
# Conditioning on (a=1, o=1):   p0: 1/2 * 1/4 * 1/3 = 1/24,  p1: 1/2 * 3/4 * 2/3 = 6/24  -> 1/7, 6/7
# then on (a=1, o=0):           p0: 1/7 * 1/4 * 2/3 = 1/42,  p1: 6/7 * 3/4 * 1/3 = 9/42  -> 1/10, 9/10
# Intervening, do(a=1), o=1:    p0: 1/2 * 1/3 = 1/6,         p1: 1/2 * 2/3 = 2/6        -> 1/3, 2/3
# then do(a=1), o=0:            p0: 1/3 * 2/3 = 2/9,         p1: 2/3 * 1/3 = 2/9        -> 1/2, 1/2
# One success and one failure are no evidence at all, yet the conditioning agent is 9/10 sure:
# its own two presses of a=1 did the convincing.

HISTORY = [(1, 1), (1, 0)]
GOLDEN_CONDITIONING = [[F(1, 2), F(1, 2)], [F(1, 7), F(6, 7)], [F(1, 10), F(9, 10)]]
GOLDEN_INTERVENING = [[F(1, 2), F(1, 2)], [F(1, 3), F(2, 3)], [F(1, 2), F(1, 2)]]


def test_golden_posteriors_are_exact_fractions():
    cond = posterior_path(EXAMPLE, HISTORY, intervene=False)
    do = posterior_path(EXAMPLE, HISTORY, intervene=True)
    assert cond == GOLDEN_CONDITIONING
    assert do == GOLDEN_INTERVENING
    assert all(isinstance(x, F) for row in cond + do for x in row), "exact inputs must give exact outputs"
    assert posterior(EXAMPLE, HISTORY, intervene=False) == GOLDEN_CONDITIONING[-1]


def test_sequential_update_equals_batch_bayes():
    # P(p | h) proportional to P(p) * prod_t P(a_t | p)^[conditioning] * P(o_t | p, a_t), normalised once.
    history = [(1, 1), (0, 1), (1, 0), (1, 1), (0, 0)]
    for intervene in (False, True):
        unnorm = []
        for p in range(2):
            w = EXAMPLE.prior[p]
            for a, o in history:
                w *= EXAMPLE.outcome[p][a][o] * (1 if intervene else EXAMPLE.policy[p][a])
            unnorm.append(w)
        assert posterior(EXAMPLE, history, intervene=intervene) == [w / sum(unnorm) for w in unnorm]


def test_outcome_predictive_conditioning_vs_do():
    # P(p | a=1) = (1/4, 3/4), so P(o=1 | a=1) = 1/4 * 1/3 + 3/4 * 2/3 = 7/12;
    # P(o=1 | do(a=1)) = 1/2 * 1/3 + 1/2 * 2/3 = 1/2 (the paper's sum_p P(p) P(o | p, a*)).
    assert outcome_predictive(EXAMPLE, [], 1, intervene=False) == [F(5, 12), F(7, 12)]
    assert outcome_predictive(EXAMPLE, [], 1, intervene=True) == [F(1, 2), F(1, 2)]


def test_intervening_posterior_does_not_depend_on_the_policy():
    other = HypothesisClass(EXAMPLE.prior, [["1/10", "9/10"], ["1/2", "1/2"]], EXAMPLE.outcome)
    assert posterior(other, HISTORY, intervene=True) == posterior(EXAMPLE, HISTORY, intervene=True)
    assert posterior(other, HISTORY, intervene=False) != posterior(EXAMPLE, HISTORY, intervene=False)


def test_floats_are_accepted_and_stay_floats():
    h = HypothesisClass(
        [0.5, 0.5], [[0.75, 0.25], [0.25, 0.75]], [[[0.5, 0.5], [2 / 3, 1 / 3]], [[0.5, 0.5], [1 / 3, 2 / 3]]]
    )
    cond = posterior(h, HISTORY, intervene=False)
    assert all(isinstance(x, float) for x in cond)
    np.testing.assert_allclose(cond, [0.1, 0.9], rtol=1e-12)
    np.testing.assert_allclose(posterior(h, HISTORY, intervene=True), [0.5, 0.5], rtol=1e-12)


@pytest.mark.parametrize(
    "prior, policy, outcome, match",
    [
        (["1/2", "1/3"], [[1], [1]], [[[1]], [[1]]], "prior"),
        ([1, 0], [[1]], [[[1]], [[1]]], "same 2 hypotheses"),
        ([1], [["1/2", "1/2"]], [[[1]]], "same 2 actions"),
        ([1], [[1]], [[[-0.5, 1.5]]], "outcome"),
    ],
)
def test_invalid_models_are_rejected(prior, policy, outcome, match):
    with pytest.raises(ValueError, match=match):
        HypothesisClass(prior, policy, outcome)


def test_impossible_history_is_an_error():
    h = HypothesisClass([1, 0], [[1], [1]], [[[1, 0]], [[1, 0]]])
    with pytest.raises(ValueError, match="probability 0"):
        posterior(h, [(0, 1)], intervene=True)


# ---------------------------------------------------------------- 2. Self-delusion

CFG = TheoryConfig(seeds=32, steps=150, seed=7)


@pytest.fixture(scope="module")
def sim():
    return simulate_delusion(CFG)


def test_observational_agent_deludes_itself_and_interventional_does_not(sim):
    final = {name: sim[name]["mass"][:, -1].mean() for name in ("observational", "interventional", "expert")}
    assert final["interventional"] > 0.95, final
    assert final["expert"] > 0.95, final
    assert final["observational"] < 0.5, final
    assert final["interventional"] - final["observational"] > 0.5, final
    # Not slow learning but lock-in: most observational runs are sure of a wrong program.
    assert (sim["observational"]["mass"][:, -1] < 0.01).mean() > 0.5


def test_simulation_matches_exact_posterior_on_replayed_histories(sim):
    # Parity with the exact code: replay each agent's own (action, outcome) history through
    # posterior_path and recover the numpy log-space posterior on the true program.
    model = delusion_model(CFG)
    for name, intervene in (("observational", False), ("interventional", True), ("expert", False)):
        for s in range(4):
            history = list(zip(sim[name]["actions"][s].tolist(), sim[name]["outcomes"][s].tolist()))
            exact = [p[sim["true"][s]] for p in posterior_path(model, history, intervene=intervene)]
            np.testing.assert_allclose(sim[name]["mass"][s], exact, atol=1e-9, err_msg=f"{name} seed {s}")


def test_with_an_uninformative_verifier_only_the_observational_agent_becomes_sure():
    cfg = replace(CFG, verifier_hit=0.5, verifier_miss=0.5, steps=100)
    sim = simulate_delusion(cfg)
    k = cfg.hypotheses
    np.testing.assert_allclose(sim["interventional"]["mass"], 1 / k, atol=1e-12)
    obs = sim["observational"]["mass"][:, -1]
    assert ((obs < 0.01) | (obs > 0.99)).all(), "self-made evidence should make every run certain"
    assert abs(obs.mean() - 1 / k) < 0.25, "certain, but right no more often than the prior"


def test_config_rejects_degenerate_probabilities():
    with pytest.raises(ValueError, match="must lie in"):
        TheoryConfig(verifier_hit=1.0)
    with pytest.raises(ValueError, match="seeds"):
        TheoryConfig(seeds=1)


# ---------------------------------------------------------------- 3. Prediction lemma


@pytest.mark.parametrize("seed, size, concentration", [(0, 2, 0.5), (1, 3, 0.5), (2, 3, 2.0), (3, 4, 0.3), (4, 2, 1.0)])
def test_prediction_lemma_identity_on_random_joints(seed, size, concentration):
    rng = np.random.default_rng(seed)
    joint = random_joint(rng, size, concentration)
    values = rng.normal(size=size) * 3
    lemma = prediction_lemma(joint, values)
    assert abs(joint.sum() - 1) < 1e-12
    assert abs(lemma["residual"]) < 1e-12, lemma
    assert lemma["gap"] > 1e-4, "the agent's actions and side information should carry information about t4"
    assert lemma["mse_m1"] < lemma["mse_m0"]


def test_no_gap_when_actions_say_nothing_about_t4():
    # t4 depends on t1, t2, t3 only and the actions only on the t's: then m1 = m0, and the
    # inequality of the lemma is an equality (the paper's "strict exactly when ..." condition).
    rng = np.random.default_rng(5)
    n = 3
    p_t = rng.dirichlet(np.ones(n**3)).reshape(n, n, n)
    p_extra = rng.dirichlet(np.ones(n**3), size=(n, n, n)).reshape((n,) * 6)  # P(a1 a2 x3 | t1 t2 t3)
    p_t4 = rng.dirichlet(np.ones(n), size=(n, n, n))  # P(t4 | t1 t2 t3)
    joint = np.einsum("ace,acebdf,aceg->abcdefg", p_t, p_extra, p_t4)
    lemma = prediction_lemma(joint, np.arange(n, dtype=float))
    assert abs(lemma["gap"]) < 1e-15 and abs(lemma["residual"]) < 1e-12, lemma


def test_conditional_mean_matches_brute_force():
    rng = np.random.default_rng(6)
    joint, values = random_joint(rng, 2), np.array([-1.0, 2.0])
    m0 = np.broadcast_to(conditional_mean(joint, values, (0, 2, 4)), joint.shape)
    t1, t2, t3 = 1, 0, 1
    num = den = 0.0
    for idx in np.ndindex(joint.shape):
        if (idx[0], idx[2], idx[4]) == (t1, t2, t3):
            num += joint[idx] * values[idx[6]]
            den += joint[idx]
    assert m0[t1, 0, t2, 1, t3, 0, 0] == pytest.approx(num / den, rel=1e-12)


def test_sampled_histories_agree_with_exact_errors():
    rng = np.random.default_rng(8)
    joint, values = random_joint(rng, 3), np.arange(3.0)
    exact, sampled = prediction_lemma(joint, values), sampled_mse(joint, values, rng, 200_000)
    assert sampled["mse_m0"] == pytest.approx(exact["mse_m0"], abs=0.02)
    assert sampled["mse_m1"] == pytest.approx(exact["mse_m1"], abs=0.02)


# ---------------------------------------------------------------- 4. CLI


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dostream.cli", "theory", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_cli_smoke_writes_figure_and_summary(tmp_path):
    r = _cli("--out", tmp_path, "--seeds", 4, "--steps", 20, "--lemma-models", 2, "--samples", 1000)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "theory.png").stat().st_size > 1000
    assert "1/10, 9/10" in r.stdout and "Prediction lemma" in r.stdout, r.stdout
    assert json.loads((tmp_path / "theory.json").read_text())["config"]["steps"] == 20


def test_cli_json_and_bad_arguments(tmp_path):
    r = _cli("--out", tmp_path, "--seeds", 3, "--steps", 5, "--lemma-models", 1, "--samples", 100, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bayes"]["intervening"][-1] == ["1/2", "1/2"]
    assert len(out["delusion"]["observational"]["mean_by_step"]) == 6
    assert abs(out["lemma"][0]["residual"]) < 1e-12
    bad = _cli("--out", tmp_path, "--verifier-hit", "1.0")
    assert bad.returncode == 2 and "must lie in" in bad.stderr


def test_docstring_examples():
    import doctest

    import dostream.theory

    results = doctest.testmod(dostream.theory)
    assert results.failed == 0 and results.attempted >= 5, results
