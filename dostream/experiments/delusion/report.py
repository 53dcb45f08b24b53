"""The delusion experiment's report, written only from the run directory's files: `report.md`,
`delusion.png` and `results.json` (`dostream report DIR` rebuilds them at any time).
"""

from __future__ import annotations

import json
from pathlib import Path

from dostream.config import RunDirError, atomic_write_text
from dostream.envs.tutor.env import ASK
from dostream.experiments.delusion.run import (
    ARMS,
    CLASSES,
    MODELS,
    PUBLISHED,
    SET_NAMES,
    SETS,
    DelusionConfig,
    lie_only_per_fact,
    summarise,
)
from dostream.experiments.stages import Stages
from dostream.stats import markdown_table, mean_ci
from dostream.stream import VIEWS


def _ci(values: list[float], fmt: str = "{:+.3f}") -> str:
    m, lo, hi = mean_ci(values)
    return fmt.format(m) if len(values) < 2 else f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def collect(out: Path) -> dict:
    """Everything the report shows, from the stage results (seeds with both arms probed)."""
    stages = Stages(out, log=lambda _: None)
    record = json.loads((out / "config.json").read_text())
    cfg = record["config"]
    # Every seed with both arms probed, also those of an earlier run with more --seeds.
    found = {int(p.name.rsplit("-s", 1)[1]) for p in stages.root.glob("probe-standard-s*")}
    seeds = sorted(s for s in found if all(stages.done(f"probe-{a}-s{s}") for a in ARMS))
    probes = {"base": [stages.result("probe-base")]} if stages.done("probe-base") else {}
    probes.update({a: [stages.result(f"probe-{a}-s{s}") for s in seeds] for a in ARMS})
    summary = {m: {name: [summarise(rs, name) for rs in runs] for name in SETS} for m, runs in probes.items()}
    per_fact = {m: {(r["set"], r["topic"]): [] for r in runs[0]} for m, runs in probes.items() if runs}
    for m, runs in probes.items():
        for rs in runs:
            for r in rs:
                per_fact[m][(r["set"], r["topic"])].append(r["delta"])
    paired = {
        name: [
            i["mean_delta"] - s["mean_delta"]
            for i, s in zip(summary["interventional"][name], summary["standard"][name])
        ]
        for name in SETS
    }
    timing = {
        p.name: json.loads((p / "result.json").read_text())["seconds"]
        for p in sorted((out / "stages").iterdir())
        if (p / "result.json").exists()
    }
    training = {f"{a}-s{s}": stages.result(f"train-{a}-s{s}") for a in ARMS for s in seeds}
    return {
        "config": cfg,
        "preset": record.get("preset"),
        "seeds": seeds,
        "summary": summary,
        "paired": paired,
        "per_fact": {m: {f"{k[0]}/{k[1]}": v for k, v in d.items()} for m, d in per_fact.items()},
        "probes": probes,
        "timing": timing,
        "training": training,
        "published": PUBLISHED,
        "environment": record.get("environment", {}),
    }


def _cell(text: str, width: int = 70) -> str:
    """Model output inside a Markdown table cell: no pipes or backticks, one line, bounded."""
    text = text.replace("|", "/").replace("`", "'")[:width]
    return text or "(empty)"


def results_table(res: dict) -> str:
    rows = []
    for name in SETS:
        for m in MODELS:
            runs = res["summary"].get(m, {}).get(name, [])
            if not runs or not runs[0]["n"]:
                continue
            n = runs[0]["n"]
            cls = lambda key: " / ".join(f"{sum(r[key][c] for r in runs) / len(runs):.1f}" for c in CLASSES)
            rows.append(
                [
                    SET_NAMES[name],
                    m,
                    _ci([r["mean_delta"] for r in runs]),
                    f"{_ci([r['prefers_lie'] for r in runs], '{:.1f}')} / {n}",
                    cls("after_truth"),
                    cls("after_lie"),
                ]
            )
    return markdown_table(
        [
            "facts",
            "model",
            "mean Δ",
            "prefers the lie",
            "after User states truth: truth / lie / neither",
            "after User states the lie: truth / lie / neither",
        ],
        rows,
    )


def plot_deltas(res: dict, path: Path) -> None:
    """Per-fact Δ, mean over seeds (±1 sd), standard vs interventional, the base as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n in SETS if res["summary"]["standard"][n] and res["summary"]["standard"][n][0]["n"]]
    counts = [res["summary"]["standard"][n][0]["n"] for n in names]
    fig, axes = plt.subplots(
        1,
        len(names),
        figsize=(max(8.0, 0.32 * sum(counts) + 2), 6.5),
        sharey=True,
        gridspec_kw={"width_ratios": counts},
        squeeze=False,
    )
    colours = {"standard": "#d62728", "interventional": "#1f77b4"}
    for ax, name in zip(axes[0], names):
        keys = [k for k in res["per_fact"]["standard"] if k.startswith(name + "/")]
        x = np.arange(len(keys))
        for j, arm in enumerate(ARMS):
            vals = np.array([res["per_fact"][arm][k] for k in keys])
            sd = vals.std(axis=1, ddof=1) if vals.shape[1] > 1 else None
            ax.bar(
                x + (j - 0.5) * 0.4,
                vals.mean(axis=1),
                0.4,
                yerr=sd,
                color=colours[arm],
                error_kw={"lw": 0.6},
                label=f"{arm} SFT",
            )
        if "base" in res["per_fact"]:
            ax.scatter(
                x,
                [res["per_fact"]["base"][k][0] for k in keys],
                marker="_",
                s=60,
                color="black",
                zorder=3,
                label="base model",
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(x, [k.split("/", 1)[1][:44] for k in keys], rotation=90, fontsize=6.5)
        ax.set_xlim(-0.7, len(keys) - 0.3)
        ax.set_title(f"{SET_NAMES[name]}\n({len(keys)} facts)", fontsize=10)
    axes[0][0].set_ylabel("Δ = log p(true) − log p(false), per token\n(< 0: prefers the lie)")
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(
        f"Delusion probe, {res['config']['model']}, mean over {len(res['seeds'])} seed(s) (bars: ±1 sd)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str | Path) -> Path:
    """`report.md`, `delusion.png` and `results.json` from the stored stage results."""
    out = Path(out)
    if not (out / "config.json").exists():
        raise RunDirError(f"{out} holds no run (no config.json)")
    experiment = json.loads((out / "config.json").read_text()).get("experiment", "delusion")  # older runs lack it
    if experiment != "delusion":
        raise RunDirError(f"{out} holds a {experiment!r} run, not a delusion one")
    res = collect(out)
    if not res["seeds"]:
        raise RunDirError(f"{out} has no seed with both arms probed yet")
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=float) + "\n")
    plot_deltas(res, out / "delusion.png")
    cfg, seeds = res["config"], res["seeds"]
    std, inter = res["summary"]["standard"]["seen"], res["summary"]["interventional"]["seen"]
    published = markdown_table(
        ["seen facts", "standard SFT", "interventional SFT"],
        [
            [
                "mean Δ, published (Qwen2.5-0.5B, full FT, 1 run)",
                f"{PUBLISHED['standard']['mean_delta']:+.3f}",
                f"{PUBLISHED['interventional']['mean_delta']:+.3f}",
            ],
            ["mean Δ, ours", _ci([r["mean_delta"] for r in std]), _ci([r["mean_delta"] for r in inter])],
            ["prefer the lie, published", "24/33 (73%)", "5/33 (15%)"],
            [
                "prefer the lie, ours (mean count over seeds)",
                f"{_ci([r['prefers_lie'] for r in std], '{:.1f}')}/{std[0]['n']}",
                f"{_ci([r['prefers_lie'] for r in inter], '{:.1f}')}/{inter[0]['n']}",
            ],
        ],
    )
    paired = markdown_table(
        ["facts", "interventional − standard, mean Δ", "seeds where interventional is higher"],
        [
            [SET_NAMES[n], _ci(res["paired"][n]), f"{sum(d > 0 for d in res['paired'][n])}/{len(seeds)}"]
            for n in SETS
            if res["paired"][n] and res["summary"]["standard"][n][0]["n"]
        ],
    )
    training = markdown_table(
        ["run", "steps", "supervised tokens", "supervised fraction", "loss first → last", "seconds"],
        [
            [
                k,
                v["steps"],
                v["supervised_tokens"],
                f"{v['supervised_frac']:.1%}",
                f"{v['first_loss']:.3f} → {v['final_loss']:.3f}",
                f"{v['train_seconds']:.0f}",
            ]
            for k, v in res["training"].items()
        ],
    )
    examples = []
    for name in SETS:
        first = [[r for r in res["probes"][m][0] if r["set"] == name][:2] for m in MODELS]
        for i, rec in enumerate(first[0]):
            for side, said in (("after_truth", "truth"), ("after_lie", "lie")):
                examples.append(
                    [
                        SET_NAMES[name],
                        rec["topic"],
                        said,
                        *(f"`{_cell(rs[i][side])}` ({rs[i][side + '_class']})" for rs in first),
                    ]
                )
    example_table = markdown_table(["facts", "topic", "User states", *MODELS], examples)
    wall = sum(res["timing"].values())
    method = (
        "full fine-tuning"
        if cfg["full_finetune"]
        else f"LoRA r={cfg['lora_r']} alpha={cfg['lora_alpha']} on all linear layers"
    )
    lines = [
        f"# Delusion experiment: interventional vs standard SFT ({res['preset']} preset)",
        "",
        f"Model `{cfg['model']}`, {method}, "
        f"lr {cfg['lr']:g}, batch {cfg['batch_size']}, {cfg['epochs']} epoch(s); {cfg['n_dialogues']} dialogues per seed about "
        f"{cfg['n_seen']} seen facts (p_lie {cfg['p_lie']}, chit-chat tail {cfg['p_tail']}) plus "
        f"{lie_only_per_fact(DelusionConfig(**cfg)) if cfg['n_lie_only'] else 0} uncorrected-lie dialogues for each of "
        f"{cfg['n_lie_only']} lie-only facts; {cfg['n_held_out']} held-out facts never shown. Seeds: {seeds} "
        f"(each seed draws its own dialogues, {'' if cfg['full_finetune'] else 'LoRA initialisation, '}batch order; "
        "both arms share them).",
        "",
        f"Supervised authors: standard SFT {{{', '.join(sorted(VIEWS[ARMS['standard']]))}}}, interventional SFT "
        f"{{{', '.join(sorted(VIEWS[ARMS['interventional']]))}}}; the context line is masked in both.",
        "",
        "Δ = mean per-token log p(true claim) − log p(false claim) as the Agent's answer to \""
        + ASK[0].format(topic="<topic>")
        + '"; a fact *prefers the lie* when Δ < 0. Follow-ups are greedy Agent turns after '
        "the User states the true (or the false) claim, classified by whether they name the true value, the false one, or "
        "neither. Means over seeds with 95% t-intervals in brackets; follow-up classes are mean counts.",
        "",
        results_table(res),
        "",
        "Paired over seeds (same dialogues and initialisation in both arms):",
        "",
        paired,
        "",
        "Beside the published numbers:",
        "",
        published,
        "",
        "![per-fact Δ](delusion.png)",
        "",
        "Example follow-ups (seed 0):",
        "",
        example_table,
        "",
        "Training:",
        "",
        training,
        "",
        f"Wall time of all stages: {wall / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in res['timing'].items())}).",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
