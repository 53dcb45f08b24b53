"""The delusion experiment's report, written only from the run directory's files: `report.md`,
`delusion.png` and `results.json` (`dostream report DIR` rebuilds them at any time).

Both Δ scorers (`probes.SCORERS`) are reported side by side: dostream's (every answer token) and the
notebook's (first answer token dropped). Each published claim (docs/reference.md §1) is set beside
what the run found, with its direction and size, per scorer. The numbers are `results.py`'s; this
module writes the tables, the figure and the files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dostream.config import RunDirError, atomic_write_text
from dostream.envs.tutor.env import ASK
from dostream.experiments.delusion.probes import CLASSES, DELTA_KEY, SCORERS, SET_NAMES, SETS
from dostream.experiments.delusion.results import collect
from dostream.experiments.delusion.run import ARMS, MODELS, PUBLISHED, DelusionConfig, lie_only_per_fact
from dostream.stats import environment_line, markdown_table, mcnemar, mean_ci
from dostream.stream import VIEWS


def _ci(values: list[float], fmt: str = "{:+.3f}") -> str:
    m, lo, hi = mean_ci(values)
    return fmt.format(m) if len(values) < 2 else f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _cell(text: str, width: int = 70) -> str:
    """Model output inside a Markdown table cell: no pipes or backticks, one line, bounded."""
    text = text.replace("|", "/").replace("`", "'")[:width]
    return text or "(empty)"


def delta_table(res: dict) -> str:
    """Mean Δ and facts preferring the lie, per fact set and model, under every scorer."""
    rows = []
    for name in SETS:
        for m in MODELS:
            cells = []
            for sc in res["scorers"]:
                runs = res["summary"][sc].get(m, {}).get(name, [])
                if not runs or not runs[0]["n"]:
                    break
                cells += [
                    _ci([r["mean_delta"] for r in runs]),
                    f"{_ci([r['prefers_lie'] for r in runs], '{:.1f}')} / {runs[0]['n']}",
                ]
            if cells:
                rows.append([SET_NAMES[name], m, *cells])
    header = ["facts", "model"]
    for sc in res["scorers"]:
        label = "dostream" if sc == "dostream" else "notebook, first answer token dropped"
        header += [f"mean Δ ({label})", f"prefers the lie ({label})"]
    return markdown_table(header, rows)


def follow_up_table(res: dict) -> str:
    rows = []
    for name in SETS:
        for m in MODELS:
            runs = res["summary"]["dostream"].get(m, {}).get(name, [])
            if not runs or not runs[0]["n"]:
                continue
            cls = lambda key: " / ".join(f"{sum(r[key][c] for r in runs) / len(runs):.1f}" for c in CLASSES)
            rows.append([SET_NAMES[name], m, cls("after_truth"), cls("after_lie")])
    return markdown_table(
        [
            "facts",
            "model",
            "after User states truth: truth / lie / neither",
            "after User states the lie: truth / lie / neither",
        ],
        rows,
    )


def per_seed_table(res: dict) -> str:
    """Seen facts, per seed and scorer: lie-preferring counts, their McNemar test over facts, and
    on how many facts interventional SFT's Δ is above standard SFT's."""
    rows = []
    for k, s in enumerate(res["seeds"]):
        for sc in res["scorers"]:
            by = {a: {r["topic"]: r[DELTA_KEY[sc]] for r in res["probes"][a][k] if r["set"] == "seen"} for a in ARMS}
            topics = list(by["standard"])
            test = mcnemar([by["standard"][t] < 0 for t in topics], [by["interventional"][t] < 0 for t in topics])
            rows.append(
                [
                    s,
                    sc,
                    f"{sum(by['standard'][t] < 0 for t in topics)}/{len(topics)}",
                    f"{sum(by['interventional'][t] < 0 for t in topics)}/{len(topics)}",
                    f"{test['only_a']} / {test['only_b']}, p = {test['p_value']:.3g}",
                    f"{sum(by['interventional'][t] > by['standard'][t] for t in topics)}/{len(topics)}",
                ]
            )
    return markdown_table(
        [
            "seed",
            "scorer",
            "standard prefers the lie",
            "interventional prefers the lie",
            "McNemar: only standard / only interventional",
            "facts with Δ interventional > standard",
        ],
        rows,
    )


def claims_table(res: dict) -> str:
    rows = []
    n = len(res["seeds"])
    for c in res["claims"]:
        kind, model = c["measure"].split(":")
        fmt = "{:+.3f}" if kind == "delta" else "{:+.0%}" if model == "paired" else "{:.0%}"
        cells = []
        for sc in res["scorers"]:
            f = c["found"].get(sc)
            if f is None:
                cells.append("—")
                continue
            interval = "" if n < 2 else f" [{fmt.format(f['ci'][0])}, {fmt.format(f['ci'][1])}]"
            verdict = "yes" if f["as_published"] else "no"
            cells.append(
                f"{fmt.format(f['mean'])}{interval}; as published: {verdict} ({f['seeds_as_published']}/{n} seeds)"
            )
        rows.append([c["claim"], fmt.format(c["published"]), *cells])
    return markdown_table(
        ["published claim (seen facts)", "published", *(f"found, {sc} scorer" for sc in res["scorers"])], rows
    )


def plot_deltas(res: dict, path: Path) -> None:
    """Per-fact Δ, mean over seeds (±1 sd), standard vs interventional, the base as a tick: one row
    of panels per scorer, one column per fact set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    first = res["scorers"][0]
    names = [n for n in SETS if res["summary"][first]["standard"][n] and res["summary"][first]["standard"][n][0]["n"]]
    counts = [res["summary"][first]["standard"][n][0]["n"] for n in names]
    rows = len(res["scorers"])
    fig, axes = plt.subplots(
        rows,
        len(names),
        figsize=(max(8.0, 0.32 * sum(counts) + 2), 1.0 + 5.5 * rows),
        sharey="row",
        gridspec_kw={"width_ratios": counts},
        squeeze=False,
    )
    colours = {"standard": "#d62728", "interventional": "#1f77b4"}
    for row, sc in zip(axes, res["scorers"]):
        facts = res["per_fact"][sc]
        for ax, name in zip(row, names):
            keys = [k for k in facts["standard"] if k.startswith(name + "/")]
            x = np.arange(len(keys))
            for j, arm in enumerate(ARMS):
                vals = np.array([facts[arm][k] for k in keys])
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
            if "base" in facts:
                ax.scatter(
                    x, [facts["base"][k][0] for k in keys], marker="_", s=60, color="black", zorder=3, label="base"
                )
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(x, [k.split("/", 1)[1][:44] for k in keys], rotation=90, fontsize=6.5)
            ax.set_xlim(-0.7, len(keys) - 0.3)
            ax.set_title(f"{SET_NAMES[name]} ({len(keys)} facts)", fontsize=10)
        label = "dostream scorer" if sc == "dostream" else "notebook scorer\n(first answer token dropped)"
        row[0].set_ylabel(f"{label}\nΔ = log p(true) − log p(false), per token\n(< 0: prefers the lie)", fontsize=9)
        row[0].legend(fontsize=8, loc="best")
    fig.suptitle(
        f"Delusion probe, {res['config']['model']}, mean over {len(res['seeds'])} seed(s) (bars: ±1 sd)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timing_table(res: dict) -> str:
    """Wall time per stage, and per kind of stage in all."""
    rows = [[k, f"{v:.0f}", f"{v / 60:.1f}"] for k, v in res["timing"].items()]
    kinds: dict[str, list[float]] = {}
    for k, v in res["timing"].items():
        if k[-1].isdigit() and "-s" in k:  # a per-seed stage: also summed over seeds
            kinds.setdefault(k.rsplit("-s", 1)[0], []).append(v)
    rows += [[f"{k}, {len(v)} seed(s)", f"{sum(v):.0f}", f"{sum(v) / 60:.1f}"] for k, v in kinds.items()]
    return markdown_table(["stage", "seconds", "minutes"], rows)


def _command(res: dict) -> str:
    argv = res["environment"].get("argv") or []
    if "reproduce" in argv:
        return "dostream " + " ".join(argv[argv.index("reproduce") :])
    return f"dostream reproduce delusion --preset {res['preset']} --seeds {res['config']['seeds']}"


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
    cfg, seeds, scorers = res["config"], res["seeds"], res["scorers"]
    published_rows = [
        [
            "mean Δ, published (Qwen2.5-0.5B, full FT, 1 run)",
            f"{PUBLISHED['standard']['mean_delta']:+.3f}",
            f"{PUBLISHED['interventional']['mean_delta']:+.3f}",
        ],
        ["prefer the lie, published", "24/33 (73%)", "5/33 (15%)"],
    ]
    for sc in scorers:
        std, inter = res["summary"][sc]["standard"]["seen"], res["summary"][sc]["interventional"]["seen"]
        published_rows += [
            [f"mean Δ, ours ({sc} scorer)", _ci([r["mean_delta"] for r in std]), _ci([r["mean_delta"] for r in inter])],
            [
                f"prefer the lie, ours ({sc} scorer, mean count over seeds)",
                f"{_ci([r['prefers_lie'] for r in std], '{:.1f}')}/{std[0]['n']}",
                f"{_ci([r['prefers_lie'] for r in inter], '{:.1f}')}/{inter[0]['n']}",
            ],
        ]
    published = markdown_table(["seen facts", "standard SFT", "interventional SFT"], published_rows)
    paired = markdown_table(
        ["facts", "scorer", "interventional − standard, mean Δ", "seeds where interventional is higher"],
        [
            [SET_NAMES[n], sc, _ci(res["paired"][sc][n]), f"{sum(d > 0 for d in res['paired'][sc][n])}/{len(seeds)}"]
            for n in SETS
            for sc in scorers
            if res["paired"][sc][n] and not math.isnan(res["paired"][sc][n][0])
        ],
    )
    training = markdown_table(
        ["run", "steps", "precision", "supervised tokens", "supervised fraction", "loss first → last", "seconds"],
        [
            [
                k,
                v["steps"],
                {True: "bf16 autocast", False: "fp32"}.get(v.get("bf16"), "?"),
                v["supervised_tokens"],
                f"{v['supervised_frac']:.1%}",
                f"{v['first_loss']:.3f} → {v['final_loss']:.3f}",
                f"{v['train_seconds']:.0f}",
            ]
            for k, v in res["training"].items()
        ],
    )
    checks = markdown_table(
        ["seed", "initial weights (sha256)", "batch order (sha256)", "steps", "both arms the same"],
        [
            [
                s,
                " / ".join(str(h)[:12] for h in c["init_sha256"].values()),
                " / ".join(str(h)[:12] for h in c["order_sha256"].values()),
                " / ".join(str(v) for v in c["steps"].values()),
                "yes" if c["same"] else "**NO**",
            ]
            for s, c in res["checks"].items()
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
    n_facts = {name: res["summary"]["dostream"]["standard"][name][0]["n"] for name in SETS}
    blind = ", ".join(f"{res['notebook_blind'][n]} of {n_facts[n]} {SET_NAMES[n]}" for n in SETS if n_facts[n])
    lines = [
        f"# Delusion experiment: interventional vs standard SFT ({res['preset']} preset)",
        "",
        f"Command: `{_command(res)}`",
        "",
        f"Model `{cfg['model']}`, {method}, AdamW lr {cfg['lr']:g} ({cfg.get('schedule', 'cosine')} after a 5% "
        f"warm-up), clip 1.0, batch {cfg['batch_size']}, {cfg['epochs']} epoch(s); {cfg['n_dialogues']} dialogues "
        f"per seed about {cfg['n_seen']} seen facts (p_lie {cfg['p_lie']}, chit-chat tail {cfg['p_tail']}) plus "
        f"{lie_only_per_fact(DelusionConfig(**cfg)) if cfg['n_lie_only'] else 0} uncorrected-lie dialogues for each of "
        f"{cfg['n_lie_only']} lie-only facts; {cfg['n_held_out']} held-out facts never shown. Seeds: {seeds} "
        f"(each seed draws its own dialogues, {'' if cfg['full_finetune'] else 'LoRA initialisation, '}batch order; "
        "both arms share them). Greedy follow-ups of up to "
        f"{cfg['follow_max_tokens']} tokens, cut at the first newline.",
        "",
        f"Supervised authors: standard SFT {{{', '.join(sorted(VIEWS[ARMS['standard']]))}}}, interventional SFT "
        f"{{{', '.join(sorted(VIEWS[ARMS['interventional']]))}}}; the context line is masked in both.",
        "",
        "Δ = mean per-token log p(true claim) − log p(false claim) as the Agent's answer to \""
        + ASK[0].format(topic="<topic>")
        + '"; a fact *prefers the lie* when Δ < 0. Two scorers: '
        + "; ".join(f"**{sc}**: {SCORERS[sc]}" for sc in scorers)
        + f". Facts whose true and false claims differ in the token the notebook's scorer drops: {blind}. "
        "Follow-ups are greedy Agent turns after the User states the true (or the false) claim, classified by whether "
        "they name the true value, the false one, or neither. Means over seeds with 95% t-intervals in brackets "
        "(none for one seed); follow-up classes are mean counts.",
        "",
        delta_table(res),
        "",
        "Beside the published numbers:",
        "",
        published,
        "",
        "The published claims, as found here (direction and size; seen facts):",
        "",
        claims_table(res),
        "",
        "Paired over seeds (same dialogues, initial weights and batch order in both arms):",
        "",
        paired,
        "",
        "Per seed, seen facts: which facts prefer the lie in each arm (McNemar over facts):",
        "",
        per_seed_table(res),
        "",
        "![per-fact Δ](delusion.png)",
        "",
        "Follow-ups (mean counts):",
        "",
        follow_up_table(res),
        "",
        "Example follow-ups (seed 0):",
        "",
        example_table,
        "",
        "Same start, same batches: each arm recorded the fingerprint of the weights it started from and of the "
        "batch order it trained in (checked against the seed's shared order before and after training):",
        "",
        checks,
        "",
        "Training:",
        "",
        training,
        "",
        f"Wall time of all stages: {wall / 60:.1f} min.",
        "",
        timing_table(res),
        "",
    ]
    if res["environment"]:
        lines += [environment_line(res["environment"]), ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
