"""The memory experiment's report, written from its stage results (`run.py`): `results.json`,
`report.md` and `figures/success.png` (acting success against the number of interactions)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dostream.experiments.stages import Stages
from dostream.files import atomic_write_text
from dostream.stats import markdown_table, mean_ci

LOOPS = ("none", "memory", "weights", "both", "trusting")


def _ci(values: list[float]) -> dict[str, Any]:
    m, lo, hi = mean_ci(values) if values else (float("nan"),) * 3
    return {"mean": m, "low": lo, "high": hi, "values": values}


def _fmt(c: dict[str, Any]) -> str:
    if not c["values"] or math.isnan(c["mean"]):
        return "—"
    if math.isnan(c["low"]):
        return f"{c['mean']:.0%}"
    low, high = max(0.0, c["low"]), min(1.0, c["high"])  # a success rate's t interval, clipped to [0, 1]
    return f"{c['mean']:.0%} [{low:.0%}, {high:.0%}]"


def collect(out: Path) -> dict[str, Any]:
    cfg = json.loads((out / "config.json").read_text())
    conf = cfg.get("config", cfg)
    stages = Stages(out, log=lambda _: None)
    res: dict[str, Any] = {"preset": cfg.get("preset", conf.get("preset")), "config": conf, "envs": {}}
    for env in conf["envs"]:
        arms: dict[str, Any] = {}
        for arm in conf["arms"]:
            per_seed = [
                stages.result(f"{env}-s{s}-{arm}") for s in range(conf["seeds"]) if stages.done(f"{env}-s{s}-{arm}")
            ]
            if not per_seed:
                continue
            if arm == "consolidated":
                arms[arm] = {
                    "seeds": len(per_seed),
                    "heldout_no_memory": _ci(
                        [r["heldout_no_memory"]["successes"] / r["heldout_no_memory"]["n"] for r in per_seed]
                    ),
                    "both_weights_no_memory": _ci(
                        [r["both_weights_no_memory"]["successes"] / r["both_weights_no_memory"]["n"] for r in per_seed]
                    ),
                    "accepted": [
                        None if r["consolidation"] is None else r["consolidation"]["accepted"] for r in per_seed
                    ],
                    "seconds": sum(r["seconds"] for r in per_seed),
                }
                continue
            final = [r["evals"][-1]["successes"] / r["evals"][-1]["n"] for r in per_seed]
            start = [r["evals"][0]["successes"] / r["evals"][0]["n"] for r in per_seed]
            acting = [sum(r["successes"]) / max(1, len(r["successes"])) for r in per_seed]
            curve = {}  # held-out success after n episodes, over seeds
            for r in per_seed:
                for e in r["evals"]:
                    curve.setdefault(e["after_episodes"], []).append(e["successes"] / e["n"])
            arms[arm] = {
                "seeds": len(per_seed),
                "heldout_start": _ci(start),
                "heldout_final": _ci(final),
                "acting": _ci(acting),
                "curve": {str(k): _ci(v) for k, v in sorted(curve.items())},
                "acting_curve": [
                    sum(r["successes"][i] for r in per_seed) / len(per_seed)
                    for i in range(min(len(r["successes"]) for r in per_seed))
                ],
                "notes": [r["notes"] for r in per_seed],
                "updates_accepted": [sum(u["accepted"] for u in r["updates"]) for r in per_seed],
                "seconds": sum(r["seconds"] for r in per_seed),
            }
        stem = [stages.result(f"{env}-s{s}-stem") for s in range(conf["seeds"]) if stages.done(f"{env}-s{s}-stem")]
        if stem:  # Δ nats/token of the STEM oracle solutions against the base model, per adapter
            names = [k for k in stem[0]["scores"] if k != "base"]
            arms["stem_interference"] = {
                "problems": stem[0]["problems"],
                "base": [r["scores"]["base"]["nats_per_token"] for r in stem],
                "delta": {
                    k: _ci(
                        [
                            r["scores"][k]["nats_per_token"] - r["scores"]["base"]["nats_per_token"]
                            for r in stem
                            if k in r["scores"]
                        ]
                    )
                    for k in names
                },
            }
        res["envs"][env] = arms
    return res


def _paired(res_env: dict[str, Any], a: str, b: str) -> str:
    """a − b in final held-out success, paired by seed, with a Student-t interval."""
    if a not in res_env or b not in res_env:
        return "—"
    va, vb = res_env[a]["heldout_final"]["values"], res_env[b]["heldout_final"]["values"]
    d = _ci([x - y for x, y in zip(va, vb)])
    if math.isnan(d["low"]):
        return f"{d['mean']:+.0%} (one seed)"
    return f"{d['mean']:+.0%} [{d['low']:+.0%}, {d['high']:+.0%}]"


def _figure(res: dict[str, Any], out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    envs = list(res["envs"])
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.5), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for arm, data in res["envs"][env].items():
            if "curve" not in data:
                continue
            xs = [int(k) for k in data["curve"]]
            ax.plot(xs, [data["curve"][k]["mean"] for k in data["curve"]], marker="o", label=arm)
        ax.set(title=env, xlabel="interactions (episodes acted)", ylabel="held-out success", ylim=(-0.05, 1.05))
        ax.legend(fontsize=7)
    (out / "figures").mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "figures" / "success.png", dpi=110)
    plt.close(fig)
    return "figures/success.png"


def write_report(out: str | Path) -> Path:
    out = Path(out)
    res = collect(out)
    cfg = res["config"]
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=float) + "\n")
    lines = [
        "# Memory the world taught: notes, weights, both, consolidation, and the agent-trusting control",
        "",
        f"Preset `{res['preset']}`, model `{cfg['model']}`; {cfg['episodes']} episodes per arm, a distillation "
        f"and/or an update every {cfg['update_every']}, held-out evaluation ({cfg['eval_n']} items, greedy, never "
        f"acted on) every {cfg['eval_every']}. Every arm acts on the same seeded episode sequence. Means over "
        f"{cfg['seeds']} seeds with Student-t 95% intervals; per-seed values in results.json.",
        "",
        "Arms: `none` (base model), `memory` (notes only), `weights` (interventional updates only), `both`, "
        "`consolidated` (both's memory consolidated into its adapter, then evaluated with the memory removed), "
        "`trusting` (notes only, from a memory that also admits the agent's own claims as evidence: the "
        "observational control).",
        "",
    ]
    for env, arms in res["envs"].items():
        rows = []
        for arm in LOOPS:
            if arm in arms:
                a = arms[arm]
                rows.append(
                    [
                        arm,
                        _fmt(a["heldout_start"]),
                        _fmt(a["heldout_final"]),
                        _fmt(a["acting"]),
                        "/".join(map(str, a["notes"])),
                        "/".join(map(str, a["updates_accepted"])),
                    ]
                )
        lines += [
            f"## {env}",
            "",
            markdown_table(
                [
                    "arm",
                    "held-out at start",
                    "held-out at end",
                    "acting success",
                    "notes (per seed)",
                    "updates accepted",
                ],
                rows,
            ),
            "",
        ]
        if "consolidated" in arms:
            c = arms["consolidated"]
            lines += [
                f"Retention with the memory removed (held-out, greedy): `both`'s adapter alone "
                f"{_fmt(c['both_weights_no_memory'])}; after consolidating its memory into it "
                f"{_fmt(c['heldout_no_memory'])} (consolidation accepted per seed: {c['accepted']}).",
                "",
            ]
        if "stem_interference" in arms:
            si = arms["stem_interference"]
            deltas = "; ".join(
                f"`{k}` {d['mean']:+.3f}" + ("" if math.isnan(d["low"]) else f" [{d['low']:+.3f}, {d['high']:+.3f}]")
                for k, d in si["delta"].items()
            )
            lines += [
                f"Interference on the STEM test set ({si['problems']} problems' oracle solutions, the question before "
                f"each; the base model's log-likelihood {si['base'][0]:.3f} nats/token): change per final adapter, "
                f"nats/token: {deltas}.",
                "",
            ]
        lines += [
            "Paired differences in final held-out success (seed by seed):",
            "",
            f"- both − memory: {_paired(arms, 'both', 'memory')}",
            f"- both − weights: {_paired(arms, 'both', 'weights')}",
            f"- trusting − memory (evidence-only): {_paired(arms, 'trusting', 'memory')}",
            "",
        ]
    fig = _figure(res, out)
    if fig:
        lines += [f"![held-out success against interactions]({fig})", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
