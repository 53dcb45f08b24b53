"""The STEM report's figures (PNG, matplotlib's Agg backend), each drawn from `summarise`'s
results: accuracy (the paper's Figure 4), every arm under every protocol, tokens (Figure 2), the
stream's composition (Figure 3), the stream-matched repair (Figure 5), accuracy per skill.
"""

from __future__ import annotations

from pathlib import Path

from dostream.experiments.stem.paper import LABELS, PAPER, PAPER_REPAIR, PROTOCOLS, REPAIR_ARMS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_accuracy(res: dict, path: Path) -> None:
    plt = _plt()
    methods = res["methods"]
    seed0 = res["seeds"][min(res["seeds"])]
    multi = len(res["seeds"]) > 1
    fig, ax = plt.subplots(figsize=(9, 4.2))
    xs = range(len(methods))
    for i, m in enumerate(methods):
        if multi:
            s = res["summary"][m]
            y, lo, hi = s["mean"], s["t_low"], s["t_high"]
        else:
            a = seed0["accuracy"][m]
            y, (lo, hi) = a["accuracy"], a["wilson"]
        color = "#2a7" if m == "interventional" else "#c64" if m == "observational" else "#68a"
        ax.bar(i, y, color=color, width=0.6)
        ax.errorbar(i, y, yerr=[[y - lo], [hi - y]], color="black", capsize=4, lw=1)
        ax.text(i + 0.32, y, f"{100 * y:.0f}%", ha="left", va="center", fontsize=8)  # clear of the paper's marker
        if PAPER.get(m) is not None:
            ax.plot(
                i,
                PAPER[m],
                marker="D",
                color="black",
                markerfacecolor="white",
                ms=6,
                label="paper (Qwen2.5-0.5B)" if i == 0 else None,
            )
    ax.set_xticks(
        list(xs), [LABELS[m].replace(" + ", "\n+ ").replace(" stream", "\nstream") for m in methods], fontsize=8
    )
    ax.set_ylim(0, 1.15)
    ax.set_yticks([i / 5 for i in range(6)])
    ax.set_ylabel("held-out solve accuracy")
    cfg = res["config"] or {}
    what = (
        f"mean over {len(res['seeds'])} seeds, t 95% interval"
        if multi
        else f"n = {seed0['accuracy'][methods[0]]['n']}, Wilson 95% interval"
    )
    ax.set_title(f"STEM solve accuracy: {cfg.get('model')}, tools={cfg.get('tools')} ({what})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fig_protocols(res: dict, path: Path) -> None:
    plt = _plt()
    methods = res["methods"]
    multi = len(res["seeds"]) > 1
    colors = {"single": "#68a", "paper": "#c93", "retry": "#2a7"}
    names = [n for n in PROTOCOLS if res["protocols"].get(n)]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for j, name in enumerate(names):
        for i, m in enumerate(methods):
            g = res["protocols"][name].get(m)
            if g is None:
                continue
            y, (lo, hi) = (g["mean"], (g["t_low"], g["t_high"])) if multi else (g["accuracy"], g["wilson"])
            x = i + (j - (len(names) - 1) / 2) * width
            ax.bar(x, y, width, color=colors[name], label=f"{name}" if i == 0 else None)
            if lo == lo:  # one seed of several: no t interval; a t interval is drawn within [0, 1]
                lo, hi = max(lo, 0.0), min(hi, 1.0)
                ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], color="black", capsize=2, lw=0.8)
    for i, m in enumerate(methods):
        if PAPER.get(m) is not None:
            ax.plot(
                i, PAPER[m], marker="D", color="black", markerfacecolor="white", ms=6, label="paper" if i == 0 else None
            )
    ax.set_xticks(
        range(len(methods)),
        [LABELS[m].replace(" + ", "\n+ ").replace(" stream", "\nstream") for m in methods],
        fontsize=8,
    )
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("held-out solve accuracy")
    what = f"mean over {len(res['seeds'])} seeds, t 95%" if multi else "Wilson 95%"
    ax.set_title(f"Accuracy under the three evaluation protocols ({what})", fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fig_tokens(res: dict, path: Path) -> None:
    plt = _plt()
    tokens = res["seeds"][min(res["seeds"])]["tokens"]
    methods = [m for m in res["methods"] if tokens.get(m)]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sup = [tokens[m]["supervised_tokens"] for m in methods]
    ctx = [tokens[m]["context_tokens"] for m in methods]
    ax.barh(range(len(methods)), sup, color="#c33", label="loss-bearing (supervised / policy-gradient)")
    ax.barh(range(len(methods)), ctx, left=sup, color="#bbb", label="context only (masked)")
    for i, (s, c) in enumerate(zip(sup, ctx)):
        ax.text(s + c, i, f"  {s:,} / {s + c:,} ({100 * s / max(1, s + c):.0f}%)", va="center", fontsize=8)
    ax.set_yticks(range(len(methods)), [LABELS[m] for m in methods], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("token positions in the training rows")
    ax.set_xlim(0, max(s + c for s, c in zip(sup, ctx)) * 1.35)
    ax.set_title("Token accounting per method (the paper's Figure 2)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fig_composition(res: dict, path: Path) -> None:
    plt = _plt()
    stream = res["seeds"][min(res["seeds"])]["stream"]
    comp = stream["composition"]
    skills = list(comp)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    c = [comp[s]["correct"] for s in skills]
    w = [comp[s]["wrong"] for s in skills]
    ax.bar(range(len(skills)), c, color="#2a7", label="correct first attempt")
    ax.bar(range(len(skills)), w, bottom=c, color="#c33", label="wrong first attempt (+ oracle correction)")
    ax.set_xticks(range(len(skills)), skills, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("stream turns")
    ax.set_ylim(0, max(a + b for a, b in zip(c, w)) * 1.3 + 0.5)  # room for the legend above the bars
    ax.set_title(
        f"The frozen SFT-1 stream: {stream['turns']} turns, {stream['wrong']} wrong first attempts "
        f"(the paper's Figure 3)",
        fontsize=10,
    )
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fig_stream_matched(res: dict, path: Path) -> None:
    plt = _plt()
    rep = res["seeds"][min(res["seeds"])]["repair"]
    arms = [m for m in REPAIR_ARMS if m in rep["arms"]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.38
    for j, (key, label, color) in enumerate(
        (
            ("repair", "second attempt after SFT-1's wrong one + verdict", "#2a7"),
            ("plain", "plain prompt (first attempt of the arm)", "#999"),
        )
    ):
        for i, m in enumerate(arms):
            a = rep["arms"][m]
            d = a if key == "repair" else a["plain"]
            if d is None:
                continue
            y = d["rate"]
            lo, hi = d["wilson"]
            x = i + (j - 0.5) * width
            ax.bar(x, y, width, color=color, label=label if i == 0 else None)
            ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], color="black", capsize=3, lw=1)
    for m, v in (("interventional", PAPER_REPAIR["interventional"]), ("oracle_sft", PAPER_REPAIR["oracle_sft"])):
        if m in arms:
            ax.plot(
                arms.index(m) - width / 2,
                v,
                marker="D",
                color="black",
                markerfacecolor="white",
                ms=6,
                label="paper (repair)" if m == "interventional" else None,
            )
    ax.set_xticks(range(len(arms)), [LABELS[m] for m in arms], fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_yticks([i / 5 for i in range(6)])
    ax.set_ylabel("solved")
    ax.set_title(f"Stream-matched: the {rep['n']} test items SFT-1 got wrong (the paper's Figure 5)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fig_skills(res: dict, path: Path) -> None:
    plt = _plt()
    acc = res["seeds"][min(res["seeds"])]["accuracy"]
    methods = res["methods"]
    skills = sorted({s for m in methods for s in acc[m]["by_skill"]})
    grid = [[acc[m]["by_skill"].get(s, [0, 0]) for s in skills] for m in methods]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(methods) + 1.8))
    vals = [[c / n if n else float("nan") for c, n in row] for row in grid]
    im = ax.imshow(vals, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, (c, n) in enumerate(row):
            ax.text(
                j,
                i,
                f"{c}/{n}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if (c / max(n, 1)) < 0.6 else "black",
            )
    ax.set_xticks(range(len(skills)), skills, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), [LABELS[m] for m in methods], fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title("Held-out accuracy per skill (solved / questions)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
