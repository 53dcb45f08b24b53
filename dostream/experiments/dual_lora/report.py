"""The dual-LoRA experiment's report, written only from the run directory's files: `report.md`,
`results.json` and `figures/<env>.png` (`dostream report DIR` rebuilds them at any time).

Per environment and learner, over the seeds whose loops are complete: acting success (all
episodes, and the last quarter), held-out success at the start and at the end, the episodes until
held-out success first reaches the threshold, and the rule probe. Means over seeds carry Student-t
95% intervals (none with one seed); per-seed values are listed beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dostream.agent.report import COLORS, summarise_arm
from dostream.config import RunDirError, atomic_write_text
from dostream.experiments.dual_lora.run import seed_dir
from dostream.experiments.stages import Stages
from dostream.stats import environment_line, markdown_table, mean_ci

SHORT = {
    "none": "no learning",
    "interventional": "interventional (world NLL)",
    "observational": "observational (all NLL)",
    "dapo": "DAPO (reward only)",
    "dual": "dual (DAPO half + world half)",
    "dual-shared": "dual-shared (both losses, one adapter)",
}


def episodes_to(evals: list[dict[str, Any]], threshold: float) -> int | None:
    """Episodes seen at the first evaluation whose held-out success reaches `threshold` (None: never).

    >>> episodes_to([{"after_episodes": 0, "successes": 1, "n": 4}, {"after_episodes": 8, "successes": 2, "n": 4}], 0.5)
    8
    """
    return next((e["after_episodes"] for e in evals if e["n"] and e["successes"] / e["n"] >= threshold), None)


def _ci(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "ci": None, "values": []}
    m, lo, hi = mean_ci(values)
    return {"mean": m, "ci": None if len(values) < 2 else [lo, hi], "values": values}


def collect(out: Path) -> dict[str, Any]:
    """Everything the report shows, from the seed run directories whose loops are complete."""
    record = json.loads((out / "config.json").read_text())
    cfg = record["config"]
    stages = Stages(out, log=lambda _: None)
    envs: dict[str, Any] = {}
    for env in cfg["envs"]:
        seeds = sorted(
            int(p.name.rsplit("-s", 1)[1]) for p in stages.root.glob(f"loops-{env}-s*") if (p / "result.json").exists()
        )
        if not seeds:
            continue
        runs = {s: {x: summarise_arm(seed_dir(out, env, s) / x) for x in cfg["learners"]} for s in seeds}
        probes = {}
        for s in seeds:
            path = seed_dir(out, env, s) / "probe.json"
            probes[s] = json.loads(path.read_text())["models"] if path.exists() else {}
        learners = {}
        for x in cfg["learners"]:
            arms = [runs[s][x] for s in seeds]
            rate = lambda k, n: k / n if n else 0.0
            final = [a["evals"][-1] for a in arms]
            # a loop with no adapter in force at the end (no learning, or every update rejected) is the base model
            probe = [probes[s].get(x if runs[s][x]["adapter"] else "base") for s in seeds]
            learners[x] = {
                "acting": _ci([rate(a["successes"], a["episodes"]) for a in arms]),
                "acting_last_quarter": _ci(
                    [rate(a["last_quarter"]["successes"], a["last_quarter"]["n"]) for a in arms]
                ),
                "heldout_start": _ci([rate(a["evals"][0]["successes"], a["evals"][0]["n"]) for a in arms]),
                "heldout_end": _ci([rate(e["successes"], e["n"]) for e in final]),
                "heldout_best": _ci([max(rate(e["successes"], e["n"]) for e in a["evals"]) for a in arms]),
                "evals": [[[e["after_episodes"], e["successes"], e["n"]] for e in a["evals"]] for a in arms],
                "curves": [a["curve"] for a in arms],
                "updates_accepted": [a["updates"]["accepted"] for a in arms],
                "updates_rejected": [a["updates"]["rejected"] for a in arms],
                "groups_informative": [a["groups"]["informative"] for a in arms],
                "groups": [a["groups"]["total"] for a in arms],
                "probe_act": _ci([p["act"] / p["n"] for p in probe if p]),
                "probe_reply": _ci([p["reply"] / p["n"] for p in probe if p]),
                "seconds": [a["seconds"] for a in arms],
            }
        envs[env] = {"seeds": seeds, "learners": learners}
    if not envs:
        raise RunDirError(f"{out}: no complete loops yet")
    for e in envs.values():
        # The threshold: `threshold`, or where no learner's seed mean reaches it, the best seed-mean
        # held-out success any learner reached after learning began (a level some run achieved);
        # None where no learner rose above the start (every loop starts from the same base model).
        means = {
            x: [
                sum(ev[i][1] / ev[i][2] for ev in lr["evals"]) / len(lr["evals"])
                for i in range(min(map(len, lr["evals"])))
            ]
            for x, lr in e["learners"].items()
        }
        start = max(m[0] for m in means.values())
        best = max((v for m in means.values() for v in m[1:]), default=start)
        e["heldout_start_mean"] = start
        e["threshold"] = None if best <= start else min(cfg["threshold"], best)
        for lr in e["learners"].values():
            reached = [
                None
                if e["threshold"] is None
                else episodes_to([{"after_episodes": a, "successes": k, "n": n} for a, k, n in ev], e["threshold"])
                for ev in lr["evals"]
            ]
            lr["episodes_to_threshold"] = {
                "per_seed": reached,
                "reached": sum(r is not None for r in reached),
                **_ci([float(r) for r in reached if r is not None]),
            }
    timing = {
        p.name: json.loads((p / "result.json").read_text())["seconds"]
        for p in sorted(stages.root.iterdir())
        if (p / "result.json").exists()
    }
    return {
        "config": cfg,
        "preset": record.get("preset"),
        "envs": envs,
        "timing": timing,
        "environment": record.get("environment", {}),
    }


def _fmt(c: dict[str, Any], pct: bool = True) -> str:
    if c["mean"] is None:
        return "–"
    f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.0f}")
    return f(c["mean"]) + (f" [{f(c['ci'][0])}, {f(c['ci'][1])}]" if c["ci"] else "")


def _figure(env: str, data: dict[str, Any], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for x, lr in data["learners"].items():
        n = min(len(c) for c in lr["curves"])
        w = max(1, min(window, n))
        mean = [sum(c[i] for c in lr["curves"]) / len(lr["curves"]) for i in range(n)]
        xs = list(range(w, n + 1))
        ax1.plot(xs, [sum(mean[i - w : i]) / w for i in xs], color=COLORS.get(x), label=SHORT.get(x, x))
        m = min(len(ev) for ev in lr["evals"])
        ex = [lr["evals"][0][i][0] for i in range(m)]
        per = [[ev[i][1] / ev[i][2] for ev in lr["evals"]] for i in range(m)]
        ys = [sum(p) / len(p) for p in per]
        ax2.plot(ex, ys, color=COLORS.get(x), marker="o", label=SHORT.get(x, x))
        if len(lr["evals"]) > 1:
            ax2.fill_between(ex, [min(p) for p in per], [max(p) for p in per], color=COLORS.get(x), alpha=0.12)
    seeds = len(data["seeds"])
    ax1.set(
        xlabel="episode",
        ylabel=f"acting success (last {window}, mean of {seeds} seeds)",
        ylim=(-0.02, 1.02),
        title=f"{env}: acting",
    )
    ax2.set(
        xlabel="episodes acted",
        ylabel="held-out success (greedy)",
        ylim=(-0.02, 1.02),
        title=f"{env}: held-out (mean; band: min-max over seeds)",
    )
    ax1.legend(loc="upper left", fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str | Path, window: int = 16) -> Path:
    out = Path(out)
    res = collect(out)
    cfg = res["config"]
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=float) + "\n")
    lines = [
        "# Dual LoRA: a policy half that learns from reward, a world half that learns from what the world says",
        "",
        f"Preset `{res['preset']}`, model `{cfg['model']}`; {cfg['episodes']} episodes per loop (each call "
        f"played {cfg['group_size']} times in a row), an update every {cfg['update_every']}, held-out "
        f"evaluation ({cfg['eval_n']} calls, greedy) every {cfg['eval_every']}. Every learner acts on the same "
        "seeded sequence of calls. Means over seeds with Student-t 95% intervals; per-seed values in results.json.",
        "",
        "The seed article's claim (docs/reference.md §3): when the service says what it needs, the world half "
        "learns it in a few steps, while reward-only RL, which sees only *failed*, needs hundreds of rollouts.",
        "",
        f"Episodes to threshold: the episodes acted before the first evaluation whose held-out success is at "
        f"least the threshold, {cfg['threshold']:.0%}, or where no learner's seed mean reaches that, the best "
        "seed-mean held-out success any learner reached after learning began; the mean is over the seeds "
        "that reached it.",
        "",
    ]
    for env, data in res["envs"].items():
        seeds = data["seeds"]
        t = data["threshold"]
        threshold_line = (
            f"Threshold {t:.0%}" + (" (the best any learner reached)" if t < cfg["threshold"] else "")
            if t is not None
            else "No learner's held-out success rose above the start, so no threshold is defined"
        ) + f"; held-out success at the start, the same base model for all: {data['heldout_start_mean']:.0%}."
        rows = []
        for x, lr in data["learners"].items():
            et = lr["episodes_to_threshold"]
            rows.append(
                [
                    SHORT.get(x, x),
                    _fmt(lr["acting"]),
                    _fmt(lr["acting_last_quarter"]),
                    _fmt(lr["heldout_start"]),
                    _fmt(lr["heldout_end"]),
                    f"{et['reached']}/{len(seeds)}: "
                    + (_fmt(et, pct=False) if et["reached"] else "never")
                    + f" ({', '.join('–' if r is None else str(r) for r in et['per_seed'])})",
                    _fmt(lr["probe_act"]),
                    _fmt(lr["probe_reply"]),
                    f"{sum(lr['updates_accepted'])}/{sum(lr['updates_rejected'])}",
                    f"{sum(lr['groups_informative'])}/{sum(lr['groups'])}" if sum(lr["groups"]) else "–",
                ]
            )
        fig = f"figures/{env}.png"
        _figure(env, data, out / fig, window)
        lines += [
            f"## {env} ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})",
            "",
            threshold_line,
            "",
            markdown_table(
                [
                    "learner",
                    "acting success",
                    "last quarter",
                    "held-out at start",
                    "held-out at end",
                    "seeds reaching threshold: episodes (per seed)",
                    "probe: where the agent acts",
                    "probe: where the service speaks",
                    "updates accepted/rejected",
                    "informative groups",
                ],
                rows,
            ),
            "",
            f"![{env}]({fig})",
            "",
        ]
    lines += [
        "The rule probe ranks the six kinds of detail by the final adapter's mean log-prob of their words, "
        f"on {cfg['probe_tasks']} fresh held-out calls per seed, and counts how often the required one is "
        "first (chance 1/6); `no learning` is the base model. Informative groups: groups of one call whose "
        "outcomes differed, the only ones DAPO learns from.",
        "",
        "Seed run directories (each with its own report): "
        + ", ".join(f"`{env}/seed-{s}/`" for env, d in res["envs"].items() for s in d["seeds"]),
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(cfg, indent=1),
        "```",
        "",
        f"Stage wall time: {sum(res['timing'].values()):.0f} s in all.",
        "",
    ]
    env = res["environment"]
    if env:
        lines += [environment_line(env), ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
