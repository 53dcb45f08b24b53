"""Exact causal accounting: Bayes under intervention, self-delusion and the prediction lemma.

Everything here is small enough to compute exactly, so it is the ground truth the LLM code
(where "mask the agent's own tokens" is the same rule) can be checked against.

1. **Bayes under intervention** (seed paper §1.1). A `HypothesisClass` holds latent programs p
   with P(p), P(a | p) and P(o | p, a). Conditioning on an action a* the agent took itself
   multiplies by P(a* | p), as if a* were evidence about p; intervening, do(a*), replaces the
   action mechanism by a point mass, so only the outcome channel P(o | p, a*) updates p. Steps
   are independent given p, so over a history the factors multiply.

2. **Self-delusion** (Ortega et al. 2021, "Shaking the foundations"). K programs; program p is
   an expert who knows the right answer is p and answers a = p with probability `expert_accuracy`
   (the rest spread over the other answers). The world is a noisy verifier: o = 1 with
   probability `verifier_hit` if a equals the true program, `verifier_miss` otherwise. The world
   draws the true program from the (uniform) prior. The agent is a Bayesian mixture of the
   experts: each step it samples its answer from its own posterior predictive
   P(a | h) = sum_p P(p | h) P(a | p), the verifier replies, and it updates. Three updates:
     - observational: multiplies by P(a | p) P(o | p, a), reading its own sample as an expert's
       answer. The sample came from its own belief, so this step only echoes that belief back,
       sharpened; like a Polya urn it locks onto whichever program its first answers favoured;
     - interventional: multiplies by P(o | p, a) only and converges to the true program;
     - expert (reference): the same observational update, but the answers come from the true
       expert, where they really are evidence. Same arithmetic, different author.
   All three share the uniforms that drive sampling (common random numbers), per seed.

3. **Prediction lemma** (seed paper §1.3). Over a finite joint of t1, a1, t2, a2, t3, x3, t4,
   m0 = E[t4 | t1, t2, t3] (what SFT sees) and m1 = E[t4 | t1, a1, t2, a2, t3, x3] (what the
   interventional agent conditions on), computed by enumeration, satisfy
   E[(t4 - m0)^2] = E[(t4 - m1)^2] + E[(m1 - m0)^2].

>>> h = HypothesisClass(prior=["1/2", "1/2"], policy=[["3/4", "1/4"], ["1/4", "3/4"]],
...                     outcome=[[["1/2", "1/2"], ["2/3", "1/3"]], [["1/2", "1/2"], ["1/3", "2/3"]]])
>>> posterior(h, [(1, 1), (1, 0)], intervene=False)   # its own two presses count as evidence
[Fraction(1, 10), Fraction(9, 10)]
>>> posterior(h, [(1, 1), (1, 0)], intervene=True)    # one success, one failure: no information
[Fraction(1, 2), Fraction(1, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

Number = Fraction | float


# ---------------------------------------------------------------- 1. Bayes under intervention


def _num(x: Any) -> Number:
    # Ints and strings become Fractions so that sums and ratios of them stay exact; floats stay
    # floats (Fraction(0.1) would be "exact" about a value nobody meant).
    if isinstance(x, Fraction):
        return x
    if isinstance(x, (int, str, np.integer)):
        return Fraction(x if isinstance(x, str) else int(x))
    if isinstance(x, (float, np.floating)):
        return float(x)
    raise TypeError(f"probabilities must be Fraction, int, str or float, got {type(x).__name__}")


def _check_distribution(row: Sequence[Number], what: str) -> None:
    total = sum(row)
    exact = all(isinstance(x, Fraction) for x in row)
    if any(x < 0 for x in row) or not (total == 1 if exact else abs(total - 1) <= 1e-9):
        raise ValueError(f"{what} must be non-negative and sum to 1, got {list(map(str, row))}")


@dataclass(frozen=True)
class HypothesisClass:
    """Finite latent programs: prior[p] = P(p), policy[p][a] = P(a | p), outcome[p][a][o] = P(o | p, a).

    Entries may be Fractions, ints or strings like "1/3" (kept exact) or floats.
    """

    prior: Sequence[Any]
    policy: Sequence[Sequence[Any]]
    outcome: Sequence[Sequence[Sequence[Any]]]

    def __post_init__(self) -> None:
        prior = tuple(map(_num, self.prior))
        policy = tuple(tuple(map(_num, row)) for row in self.policy)
        outcome = tuple(tuple(tuple(map(_num, d)) for d in per_a) for per_a in self.outcome)
        k, n_a = len(prior), len(policy[0]) if policy else 0
        n_o = len(outcome[0][0]) if outcome and outcome[0] else 0
        if not (len(policy) == len(outcome) == k and k > 0):
            raise ValueError(f"prior, policy and outcome must list the same {k} hypotheses")
        if any(len(r) != n_a for r in policy) or any(len(per_a) != n_a for per_a in outcome):
            raise ValueError(f"every hypothesis needs a distribution over the same {n_a} actions")
        if any(len(d) != n_o for per_a in outcome for d in per_a):
            raise ValueError(f"every P(o | p, a) must range over the same {n_o} outcomes")
        _check_distribution(prior, "prior")
        for p in range(k):
            _check_distribution(policy[p], f"policy[{p}]")
            for a in range(n_a):
                _check_distribution(outcome[p][a], f"outcome[{p}][{a}]")
        for name, value in (("prior", prior), ("policy", policy), ("outcome", outcome)):
            object.__setattr__(self, name, value)  # frozen: store the coerced, validated tables


def posterior_path(
    model: HypothesisClass, history: Sequence[tuple[int, int]], *, intervene: bool
) -> list[list[Number]]:
    """P(p | h_t) for t = 0..len(history): the prior, then one posterior per (action, outcome) step.

    intervene=False conditions on each action, P(p | a*, o); intervene=True treats each action as
    do(a*), P(p | do(a*), o), so P(a* | p) never enters.

    With a single action there is nothing to choose, and the two updates agree:

    >>> coins = HypothesisClass(["1/2", "1/2"], [[1], [1]], [[["1/4", "3/4"]], [["3/4", "1/4"]]])
    >>> posterior_path(coins, [(0, 1)], intervene=False) == posterior_path(coins, [(0, 1)], intervene=True)
    True
    """
    post = list(model.prior)
    path = [post]
    for t, (a, o) in enumerate(history):
        # The only difference between the two posteriors: whether P(a* | p) is a factor.
        weights = [q * model.outcome[p][a][o] * (1 if intervene else model.policy[p][a]) for p, q in enumerate(post)]
        total = sum(weights)
        if total == 0:
            raise ValueError(f"step {t} (a={a}, o={o}) has probability 0 under every hypothesis")
        post = [w / total for w in weights]
        path.append(post)
    return path


def posterior(model: HypothesisClass, history: Sequence[tuple[int, int]], *, intervene: bool) -> list[Number]:
    """P(p | h) after the whole history; see `posterior_path`."""
    return posterior_path(model, history, intervene=intervene)[-1]


def outcome_predictive(
    model: HypothesisClass, history: Sequence[tuple[int, int]], action: int, *, intervene: bool
) -> list[Number]:
    """P(o | h, a) (intervene=False) or P(o | h, do(a)) (intervene=True), over outcomes o.

    Conditioning reweights the programs by how likely each was to choose `action`; intervening
    uses the posterior as it is (paper §1.1: P(o | do(a*)) = sum_p P(p) P(o | p, a*)).
    """
    post = posterior(model, history, intervene=intervene)
    w = post if intervene else [q * model.policy[p][action] for p, q in enumerate(post)]
    total = sum(w)
    if total == 0:
        raise ValueError(f"action {action} has probability 0 under every hypothesis")
    n_o = len(model.outcome[0][action])
    return [sum(w[p] * model.outcome[p][action][o] for p in range(len(w))) / total for o in range(n_o)]


# ---------------------------------------------------------------- 2. Self-delusion


@dataclass
class TheoryConfig:
    """Settings for `dostream theory`; every field is a command-line option."""

    seeds: int = field(default=64, metadata={"help": "independent runs of the delusion simulation"})
    steps: int = field(default=200, metadata={"help": "interaction steps per run"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw (simulation and lemma)"})
    # Delusion is stark when one self-written action says more about p than one outcome does,
    # as for an LLM: a sampled answer has a large likelihood ratio between the programs that
    # would and would not write it, while the verifier sends one noisy bit. Here a self-action
    # is worth ~1.8 nats per step against ~0.3 for the outcome, so the echo wins for ever.
    hypotheses: int = field(default=4, metadata={"help": "number of latent programs (answers)"})
    expert_accuracy: float = field(default=0.8, metadata={"help": "P(a = p | p): how often expert p answers p"})
    verifier_hit: float = field(default=0.7, metadata={"help": "P(o = 1 | a is the true program's answer)"})
    verifier_miss: float = field(default=0.3, metadata={"help": "P(o = 1 | a is any other answer)"})
    lemma_models: int = field(default=5, metadata={"help": "random joint models for the prediction lemma"})
    lemma_values: int = field(default=3, metadata={"help": "values each of t1 a1 t2 a2 t3 x3 t4 takes"})
    samples: int = field(default=100_000, metadata={"help": "histories sampled per lemma model"})

    def __post_init__(self) -> None:
        probs = (self.expert_accuracy, self.verifier_hit, self.verifier_miss)
        if not all(0 < x < 1 for x in probs):  # a zero likelihood would make the log posterior -inf
            raise ValueError(f"expert_accuracy, verifier_hit and verifier_miss must lie in (0, 1), got {probs}")
        if (
            min(self.seeds, self.hypotheses, self.lemma_values) < 2
            or min(self.steps, self.lemma_models, self.samples) < 1
        ):
            raise ValueError("need seeds, hypotheses, lemma_values >= 2 and steps, lemma_models, samples >= 1")


AGENTS = ("observational", "interventional", "expert")


def delusion_model(cfg: TheoryConfig) -> HypothesisClass:
    """The delusion setup of the module docstring as a (float) `HypothesisClass`."""
    k, acc = cfg.hypotheses, cfg.expert_accuracy
    policy = [[acc if a == p else (1 - acc) / (k - 1) for a in range(k)] for p in range(k)]
    hit = [[cfg.verifier_hit if a == p else cfg.verifier_miss for a in range(k)] for p in range(k)]
    outcome = [[[1 - h, h] for h in row] for row in hit]
    return HypothesisClass([1 / k] * k, policy, outcome)


def simulate_delusion(cfg: TheoryConfig) -> dict[str, Any]:
    """Run the three agents of the module docstring over `cfg.seeds` seeds at once.

    Returns {"true": (seeds,) true programs, and per agent name: {"mass": (seeds, steps + 1)
    posterior mass on the true program (column 0 is the prior), "actions", "outcomes": (seeds, steps)}}.
    """
    model = delusion_model(cfg)
    prior, policy, outcome = (np.asarray(x, dtype=np.float64) for x in (model.prior, model.policy, model.outcome))
    s, t_max, k = cfg.seeds, cfg.steps, cfg.hypotheses
    rng = np.random.default_rng(cfg.seed)
    true = rng.choice(k, size=s, p=prior)
    u_act, u_out = rng.random((s, t_max)), rng.random((s, t_max))
    rows = np.arange(s)
    result: dict[str, Any] = {"true": true}
    for name in AGENTS:
        # Log space: the observational agent piles up hundreds of nats of self-made "evidence".
        logpost = np.tile(np.log(prior), (s, 1))
        mass = np.empty((s, t_max + 1))
        actions = np.empty((s, t_max), dtype=np.int64)
        outcomes = np.empty((s, t_max), dtype=np.int64)
        post = np.tile(prior, (s, 1))
        mass[:, 0] = prior[true]
        for t in range(t_max):
            p_act = policy[true] if name == "expert" else post @ policy
            a = np.minimum((p_act.cumsum(axis=1) < u_act[:, t, None]).sum(axis=1), k - 1)
            o = (u_out[:, t] < outcome[true, a, 1]).astype(np.int64)
            logpost += np.log(outcome[:, a, o]).T
            if name != "interventional":
                logpost += np.log(policy[:, a]).T
            logpost -= logpost.max(axis=1, keepdims=True)
            post = np.exp(logpost)
            post /= post.sum(axis=1, keepdims=True)
            mass[:, t + 1] = post[rows, true]
            actions[:, t], outcomes[:, t] = a, o
        result[name] = {"mass": mass, "actions": actions, "outcomes": outcomes}
    return result


# ---------------------------------------------------------------- 3. Prediction lemma

HISTORY = ("t1", "a1", "t2", "a2", "t3", "x3", "t4")  # axis order of a joint; t4 is last
G0 = (0, 2, 4)  # the world's tokens t1, t2, t3: what an SFT predictor sees
G1 = (0, 1, 2, 3, 4, 5)  # also the agent's actions a1, a2 and side information x3


def random_joint(rng: np.random.Generator, size: int = 3, concentration: float = 0.5) -> np.ndarray:
    """A joint over HISTORY, built autoregressively: each variable has a random P(. | all before).

    Every variable, the actions included, feeds t4's conditional, so a1, a2, x3 carry information
    about t4 (almost surely). A concentration below 1 makes the conditionals peaked, and the gap
    E[(m1 - m0)^2] large enough to see.
    """
    joint = rng.dirichlet(np.full(size, concentration))
    for i in range(1, len(HISTORY)):
        joint = joint[..., None] * rng.dirichlet(np.full(size, concentration), size=(size,) * i)
    return joint


def conditional_mean(joint: np.ndarray, values: np.ndarray, given: Sequence[int]) -> np.ndarray:
    """E[t4 | the variables on axes `given`], shaped to broadcast against `joint` (0 where P = 0)."""
    drop = tuple(ax for ax in range(joint.ndim) if ax not in given)
    num = (joint * values).sum(axis=drop, keepdims=True)
    den = joint.sum(axis=drop, keepdims=True)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def prediction_lemma(joint: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """The three terms of E[(t4 - m0)^2] = E[(t4 - m1)^2] + E[(m1 - m0)^2], exactly, and the residual.

    `values[i]` is the number t4's i-th value stands for.

    >>> lemma = prediction_lemma(random_joint(np.random.default_rng(0)), np.arange(3.0))
    >>> abs(lemma["residual"]) < 1e-12 and lemma["gap"] > 0
    True
    """
    m0, m1 = conditional_mean(joint, values, G0), conditional_mean(joint, values, G1)
    mse_m0 = float((joint * (values - m0) ** 2).sum())
    mse_m1 = float((joint * (values - m1) ** 2).sum())
    gap = float((joint * (m1 - m0) ** 2).sum())
    return {"mse_m0": mse_m0, "mse_m1": mse_m1, "gap": gap, "residual": mse_m0 - mse_m1 - gap}


def sampled_mse(joint: np.ndarray, values: np.ndarray, rng: np.random.Generator, n: int) -> dict[str, float]:
    """Squared error of m0 and m1 on `n` histories sampled from `joint` (a Monte Carlo view of the lemma)."""
    idx = np.unravel_index(rng.choice(joint.size, size=n, p=joint.ravel()), joint.shape)
    t4 = values[idx[-1]]
    m0, m1 = (np.broadcast_to(conditional_mean(joint, values, g), joint.shape)[idx] for g in (G0, G1))
    return {"mse_m0": float(np.mean((t4 - m0) ** 2)), "mse_m1": float(np.mean((t4 - m1) ** 2)), "n": n}


# ---------------------------------------------------------------- 4. `dostream theory`

# The doctest example: program 1 presses the button (a = 1) 3/4 of the time and then sees it
# work (o = 1) 2/3 of the time; program 0 presses 1/4 of the time and sees it work 1/3.
EXAMPLE = HypothesisClass(
    prior=["1/2", "1/2"],
    policy=[["3/4", "1/4"], ["1/4", "3/4"]],
    outcome=[[["1/2", "1/2"], ["2/3", "1/3"]], [["1/2", "1/2"], ["1/3", "2/3"]]],
)
EXAMPLE_HISTORY = [(1, 1), (1, 0)]


def run_theory(cfg: TheoryConfig) -> dict[str, Any]:
    """All three results as plain JSON-able data (the delusion curves summarised per step)."""
    bayes = {
        "history": EXAMPLE_HISTORY,
        "conditioning": [list(map(str, p)) for p in posterior_path(EXAMPLE, EXAMPLE_HISTORY, intervene=False)],
        "intervening": [list(map(str, p)) for p in posterior_path(EXAMPLE, EXAMPLE_HISTORY, intervene=True)],
        "P(o=1|a=1)": str(outcome_predictive(EXAMPLE, [], 1, intervene=False)[1]),
        "P(o=1|do(a=1))": str(outcome_predictive(EXAMPLE, [], 1, intervene=True)[1]),
    }
    sim = simulate_delusion(cfg)
    delusion: dict[str, Any] = {}
    for name in AGENTS:
        mass = sim[name]["mass"]
        delusion[name] = {
            "final_mean": float(mass[:, -1].mean()),
            "final_below_0.01": int((mass[:, -1] < 0.01).sum()),
            "final_by_seed": mass[:, -1].round(6).tolist(),
            "mean_by_step": mass.mean(axis=0).round(6).tolist(),
            "se_by_step": (mass.std(axis=0, ddof=1) / np.sqrt(cfg.seeds)).round(6).tolist(),
        }
    rng = np.random.default_rng(cfg.seed)
    lemma = []
    for _ in range(cfg.lemma_models):
        joint = random_joint(rng, cfg.lemma_values)
        values = rng.normal(size=cfg.lemma_values)
        lemma.append({**prediction_lemma(joint, values), "sampled": sampled_mse(joint, values, rng, cfg.samples)})
    return {"config": asdict(cfg), "bayes": bayes, "delusion": delusion, "lemma": lemma}


def plot_delusion(results: dict[str, Any], path: Path) -> Path:
    """Left: posterior mass on the true program per step, mean over seeds with a 95% band.
    Right: where each seed ends, which shows that the observational mean is a mix of lock-ins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, d = results["config"], results["delusion"]
    labels = {
        "observational": "observational: conditions on its own actions, P(p | a*, o)",
        "interventional": "interventional: treats them as do(a*), P(p | do(a*), o)",
        "expert": "reference: conditions on a true expert's actions",
    }
    colors = {"observational": "tab:red", "interventional": "tab:blue", "expert": "0.45"}
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100, gridspec_kw={"width_ratios": [3, 1]})
    for name in AGENTS:
        mean, se = np.asarray(d[name]["mean_by_step"]), np.asarray(d[name]["se_by_step"])
        steps, dashed = np.arange(len(mean)), name == "expert"
        ax.plot(
            steps, mean, color=colors[name], ls="--" if dashed else "-", lw=1.2 if dashed else 1.8, label=labels[name]
        )
        ax.fill_between(
            steps,
            np.clip(mean - 1.96 * se, 0, 1),
            np.clip(mean + 1.96 * se, 0, 1),
            color=colors[name],
            alpha=0.18,
            lw=0,
        )
    ax.axhline(1 / cfg["hypotheses"], color="0.6", lw=0.8, ls=":", label=f"prior, 1/{cfg['hypotheses']}")
    ax.set(xlabel="interaction step t", ylabel="P(true program | history)", ylim=(-0.02, 1.02), xlim=(0, cfg["steps"]))
    ax.set_title(f"Mean over {cfg['seeds']} seeds (band: 95% CI of the mean)", fontsize=10)
    ax.legend(loc="center right", fontsize=8, frameon=False)
    ax.grid(alpha=0.25)
    bins = np.linspace(0, 1, 11)
    pair = ("observational", "interventional")
    hx.hist([d[n]["final_by_seed"] for n in pair], bins=bins, color=[colors[n] for n in pair], label=pair)
    hx.set(xlabel=f"P(true program) at t = {cfg['steps']}", ylabel="seeds")
    hx.set_title("Where each seed ends", fontsize=10)
    hx.legend(fontsize=8, frameon=False, loc="upper center")
    fig.suptitle(f"Self-delusion: an agent samples its own actions ({cfg['hypotheses']} programs, noisy verifier)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summary(results: dict[str, Any]) -> str:
    """The three results as a short readable text."""
    cfg, b, d, lemma = results["config"], results["bayes"], results["delusion"], results["lemma"]
    lines = ["1. Bayes under intervention: 2 programs, the agent's own history (a=1, o=1), (a=1, o=0)"]
    lines.append(f"   {'step':<6}{'conditioning P(p | a*, o)':<30}intervening P(p | do(a*), o)")
    for t, (c, i) in enumerate(zip(b["conditioning"], b["intervening"])):
        lines.append(f"   {t:<6}{', '.join(c):<30}{', '.join(i)}")
    lines.append(f"   before acting: P(o=1 | a=1) = {b['P(o=1|a=1)']}, P(o=1 | do(a=1)) = {b['P(o=1|do(a=1))']}")
    lines.append(
        f"\n2. Self-delusion: {cfg['hypotheses']} programs, {cfg['seeds']} seeds x {cfg['steps']} steps; "
        f"P(true program | history) at the last step"
    )
    for name, what in (
        ("observational", "conditions on own actions"),
        ("interventional", "do(own actions)"),
        ("expert", "conditions on an expert's"),
    ):
        r = d[name]
        lines.append(
            f"   {name + ' (' + what + ')':<45} mean {r['final_mean']:.3f}, "
            f"below 0.01 in {r['final_below_0.01']}/{cfg['seeds']} seeds"
        )
    lines.append(
        f"\n3. Prediction lemma: {len(lemma)} random joint models over {' '.join(HISTORY)} "
        f"({cfg['lemma_values']} values each)"
    )
    lines.append("   E[(t4-m0)^2] = E[(t4-m1)^2] + E[(m1-m0)^2]   (m0 sees t1..t3; m1 also a1, a2, x3)")
    for i, r in enumerate(lemma):
        lines.append(
            f"   model {i}: {r['mse_m0']:.4f} = {r['mse_m1']:.4f} + {r['gap']:.4f}   residual {r['residual']:+.1e}"
        )
    s = lemma[0]["sampled"]
    lines.append(
        f"   model 0, {s['n']} sampled histories: squared error of m0 {s['mse_m0']:.4f}, of m1 {s['mse_m1']:.4f}"
    )
    return "\n".join(lines)
