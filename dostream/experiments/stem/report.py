"""The STEM reproduction's report, written only from the run directory's files.

`write_report(OUT)` reads `OUT/config.json` and every `OUT/seed-*/stages/*/result.json` and writes

* `OUT/results.json`  every number the report shows (per seed, and mean ± t-interval over seeds);
                      `protocols.<single|paper|retry>.<method>`: `solved`, `n`, `accuracy`, `wilson`
                      (pooled over seeds), `mean`/`t_low`/`t_high`/`per_seed` over seeds;
                      `protocol_tests.<protocol>.<a vs b>.<seed>`: exact McNemar; `claims.<protocol>`:
                      the direction of each of the paper's claims; per seed `seeds.<s>.protocols`;
                      `protocols_missing`: stages an older run directory still lacks;
* `OUT/report.md`     accuracy under the three evaluation protocols (`paper.PROTOCOLS`), one table
                      each with Wilson 95% intervals beside the paper's numbers, paired McNemar
                      tests, the paper's claims under each, the stream-matched repair comparison,
                      token accounting, stream composition, per-skill accuracy, GRPO/ReST
                      bookkeeping, wall time per stage and the exact configuration;
* `OUT/figures/`      accuracy.png (the paper's Figure 4), protocols.png (every arm under every
                      protocol), tokens.png (Figure 2), stream_composition.png (Figure 3),
                      stream_matched.png (Figure 5), skills.png (accuracy per skill and method).

`dostream report OUT` runs it again at any time (e.g. after more seeds finished).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dostream.config import RunDirError, atomic_write_text
from dostream.experiments.stem.paper import (
    CLAIMS,
    KEY_PAIRS,
    LABELS,
    METHODS,
    PAPER,
    PAPER_REPAIR,
    PAPER_SECOND,
    PROTOCOLS,
    REPAIR_ARMS,
)
from dostream.stats import markdown_table, mcnemar, mean_ci, wilson

TRAINS_ON = {
    "base": "nothing",
    "sft1": "D_sft teacher rows, 1 epoch, solution supervised",
    "rest": "K samples/prompt, verifier-passing kept (<=1/group) + D_sft replay",
    "grpo": "K samples/prompt, group-standardised rewards, clipped ratio + KL to SFT-1",
    "dapo": "GRPO + clip-higher, dynamic sampling (flat groups dropped), token-level loss",
    "oracle_sft": "the stream's corrections as direct rows x -> y*",
    "observational": "the stream: attempts and corrections supervised",
    "interventional": "the stream: only corrections supervised (attempts are context)",
}
PAPER_TOKENS = {"observational": (51121, 81131), "interventional": (17924, 81131)}


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def collect(out: Path) -> dict:
    """Everything the stages stored, per seed: {seed: {stage: {"value", "seconds"}}}."""
    seeds = {}
    for d in sorted(out.glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
        stages = {}
        for r in sorted((d / "stages").glob("*/result.json")):
            stages[r.parent.name] = json.loads(r.read_text())
        if stages:
            seeds[int(d.name.split("-")[1])] = stages
    return seeds


# -- evaluation protocols -------------------------------------------------------------------


def _answers(value: dict) -> dict[str, bool]:
    """item id -> solved, from an `evaluate` result (a `<method>_eval`, a repair arm, a retry)."""
    return {i: bool(c) for i, c in zip(value["ids"], value["correct"])}


_NONE_WRONG = {"ids": [], "correct": []}


def _combine(ids: list[str], first: dict[str, bool], second: dict[str, bool], what: str) -> dict:
    """Per item: the first attempt if the verifier passed it, else the second attempt."""
    lacking = [i for i in ids if not first[i] and i not in second]
    if lacking:
        raise RunDirError(f"{what}: no second attempt for {len(lacking)} wrong first attempts ({lacking[0]}, ...)")
    correct = [first[i] or second[i] for i in ids]
    return {"ids": ids, "correct": correct, "second": [i for i in ids if not first[i]]}


def protocol_answers(st: dict) -> tuple[dict[str, dict[str, dict]], dict[str, list[str]]]:
    """One seed's stages ({stage: {"value", ...}}) -> the item-level answers of every method under
    every protocol (`paper.PROTOCOLS`), {protocol: {method: {"ids", "correct", "second"}}} with
    `second` the items that got a second attempt, and {protocol: [stages it still lacks]}.

    single: `<method>_eval`. paper: for `PAPER_SECOND`'s arms SFT-1's first attempt (`sft1_eval`),
    kept when correct, else the arm's repair after it (`repair`) or its own plain-prompt answer
    (its `<method>_eval`: greedy, so answering again gives the same); the other arms `single`.
    retry: the arm's own first attempt, else its second attempt (`<method>_retry`; SFT-1's is the
    `repair` stage's sft1 arm, the same episode)."""
    value = lambda name: st[name]["value"] if name in st else None
    evals = {m: st[f"{m}_eval"]["value"] for m in METHODS if f"{m}_eval" in st}
    sft1, repair = evals.get("sft1"), value("repair")
    out: dict[str, dict[str, dict]] = {name: {} for name in PROTOCOLS}
    missing: dict[str, list[str]] = {name: [] for name in PROTOCOLS}
    for m, ev in evals.items():
        ids, first = ev["ids"], _answers(ev)
        out["single"][m] = {"ids": ids, "correct": [first[i] for i in ids], "second": []}
        how = PAPER_SECOND.get(m)
        if how is None:
            out["paper"][m] = out["single"][m]
        elif sft1 is None or (how == "repair" and repair is None):
            missing["paper"].append("sft1_eval" if sft1 is None else "repair")
        else:
            second = first if how == "plain" else _answers(repair["arms"][m]) if repair["n"] else {}
            out["paper"][m] = _combine(ids, _answers(sft1), second, f"paper/{m}")
        if m == "sft1":  # the repair stage's sft1 arm (no arms when SFT-1 got every item right)
            second, stage = None if repair is None else repair["arms"].get("sft1", _NONE_WRONG), "repair"
        else:
            second, stage = value(f"{m}_retry"), f"{m}_retry"
        if second is None:
            missing["retry"].append(stage)
        else:
            out["retry"][m] = _combine(ids, first, _answers(second), f"retry/{m} ({stage})")
    return out, {k: sorted(set(v)) for k, v in missing.items() if v}


def _scored(a: dict) -> dict:
    k, n = sum(a["correct"]), len(a["correct"])
    return {
        "solved": k,
        "n": n,
        "accuracy": k / n if n else 0.0,
        "wilson": list(wilson(k, n)),
        "second_attempts": len(a["second"]),
        "correct": [int(c) for c in a["correct"]],
    }


def _pairs(methods: list[str]) -> list[tuple[str, str]]:
    """The key pairs, every paper's claim, then interventional against every other arm."""
    pairs = list(CLAIMS) + [("interventional", m) for m in methods if m != "interventional"]
    return [p for i, p in enumerate(pairs) if p not in pairs[:i] and p[0] in methods and p[1] in methods]


def _sign(x: float) -> int:
    return (x > 1e-12) - (x < -1e-12)


def protocol_summary(per_seed: dict, methods: list[str]) -> dict:
    """Over seeds, per protocol: per method the pooled count with its Wilson interval and the mean
    with a t interval; per pair the McNemar test of every seed; per paper's claim its direction."""
    protocols, tests, claims = {}, {}, {}
    for name in PROTOCOLS:
        got = {s: v["protocols"].get(name, {}) for s, v in per_seed.items()}
        protocols[name] = {}
        for m in methods:
            seeds = [s for s in got if m in got[s]]
            if not seeds:
                continue
            k, n = sum(got[s][m]["solved"] for s in seeds), sum(got[s][m]["n"] for s in seeds)
            vals = [got[s][m]["accuracy"] for s in seeds]
            mean, lo, hi = mean_ci(vals)
            protocols[name][m] = {
                "solved": k,
                "n": n,
                "accuracy": k / n if n else 0.0,
                "wilson": list(wilson(k, n)),
                "seeds": seeds,
                "per_seed": vals,
                "mean": mean,
                "t_low": lo,
                "t_high": hi,
            }
        tests[name] = {}
        for a, b in _pairs(methods):
            both = {
                s: per_seed[s]["mcnemar"][name][f"{a} vs {b}"]
                for s in got
                if f"{a} vs {b}" in per_seed[s]["mcnemar"].get(name, {})
            }
            if both:
                tests[name][f"{a} vs {b}"] = both
        claims[name] = []
        for a, b in CLAIMS:
            if a not in protocols[name] or b not in protocols[name] or PAPER.get(a) is None or PAPER.get(b) is None:
                continue
            paper_sign = _sign(PAPER[a] - PAPER[b])
            seeds = [s for s in protocols[name][a]["seeds"] if s in protocols[name][b]["seeds"]]
            if not seeds:
                continue
            ya = [got[s][a]["accuracy"] for s in seeds]
            yb = [got[s][b]["accuracy"] for s in seeds]
            ours = _sign(sum(ya) / len(ya) - sum(yb) / len(yb))
            claims[name].append(
                {
                    "a": a,
                    "b": b,
                    "paper": [PAPER[a], PAPER[b]],
                    "ours": [sum(ya) / len(ya), sum(yb) / len(yb)],
                    "direction": "tie" if ours == 0 else "same" if ours == paper_sign else "opposite",
                    "seeds": seeds,
                    "seeds_same": sum(_sign(x - y) == paper_sign for x, y in zip(ya, yb)),
                    "p_values": [tests[name][f"{a} vs {b}"][s]["p_value"] for s in seeds],
                }
            )
    return {"protocols": protocols, "tests": tests, "claims": claims}


def summarise(record: dict, seeds: dict) -> dict:
    methods = [m for m in METHODS if any(f"{m}_eval" in s for s in seeds.values())]
    per_seed = {}
    for seed, st in seeds.items():
        acc = {
            m: {k: st[f"{m}_eval"]["value"][k] for k in ("accuracy", "wilson", "n", "solved", "by_skill")}
            for m in methods
            if f"{m}_eval" in st
        }
        answers, missing = protocol_answers(st)
        protocols = {name: {m: _scored(a) for m, a in answers[name].items()} for name in PROTOCOLS}
        tests = {
            name: {
                f"{a} vs {b}": mcnemar(answers[name][a]["correct"], answers[name][b]["correct"])
                for a, b in _pairs(methods)
                if a in answers[name] and b in answers[name]
            }
            for name in PROTOCOLS
        }
        repair = None
        if "repair" in st:
            rv = st["repair"]["value"]
            repair = {"n": rv["n"], "arms": {}}
            for m, r in rv["arms"].items():
                # The same items answered from the plain prompt (no first attempt in context).
                plain = None
                if f"{m}_eval" in st:
                    e = st[f"{m}_eval"]["value"]
                    idx = {i: c for i, c in zip(e["ids"], e["correct"])}
                    k = sum(idx[i] for i in rv["ids"])
                    plain = {"solved": k, "rate": k / rv["n"] if rv["n"] else 0.0, "wilson": list(wilson(k, rv["n"]))}
                repair["arms"][m] = {
                    "solved": r["solved"],
                    "rate": r["accuracy"],
                    "wilson": r["wilson"],
                    "plain": plain,
                    "correct": r["correct"],
                }
            arms = repair["arms"]
            repair["tests"] = {
                f"interventional vs {m}": mcnemar(
                    [bool(x) for x in arms["interventional"]["correct"]], [bool(x) for x in arms[m]["correct"]]
                )
                for m in arms
                if m != "interventional" and "interventional" in arms
            }
        tokens = {m: st[m]["value"].get("tokens") for m in methods if m in st and m not in ("base",)}
        per_seed[seed] = {
            "accuracy": acc,
            "protocols": protocols,
            "mcnemar": tests,
            "missing": missing,
            "repair": repair,
            "tokens": tokens,
            "stream": st.get("stream", {}).get("value"),
            "rest": st.get("rest", {}).get("value", {}).get("selection"),
            "grpo": st.get("grpo", {}).get("value", {}).get("info"),
            "dapo": st.get("dapo", {}).get("value", {}).get("info"),
            "steps": {m: st[m]["value"].get("steps") for m in methods if m in st and isinstance(st[m]["value"], dict)},
            "seconds": {k: v["seconds"] for k, v in st.items()},
        }
    summary = {}
    for m in methods:
        vals = [per_seed[s]["accuracy"][m]["accuracy"] for s in per_seed if m in per_seed[s]["accuracy"]]
        mean, lo, hi = mean_ci(vals) if vals else (float("nan"),) * 3
        summary[m] = {"mean": mean, "t_low": lo, "t_high": hi, "per_seed": vals, "paper": PAPER.get(m)}
    over = protocol_summary(per_seed, methods)
    missing = {
        name: {s: v["missing"][name] for s, v in per_seed.items() if name in v["missing"]}
        for name in PROTOCOLS
        if any(name in v["missing"] for v in per_seed.values())
    }
    return {
        "experiment": "stem",
        "preset": record.get("preset"),
        "config": record.get("config"),
        "methods": methods,
        "seeds": per_seed,
        "summary": summary,
        "protocols": over["protocols"],
        "protocol_tests": over["tests"],
        "claims": over["claims"],
        "protocols_missing": missing,
        "paper": {"accuracy": PAPER, "repair": PAPER_REPAIR, "tokens": PAPER_TOKENS},
    }


# -- figures --------------------------------------------------------------------------------


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


# -- the markdown ---------------------------------------------------------------------------


def _pct(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}%"


def _ci(lo, hi) -> str:
    return "–" if lo is None or lo != lo else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


SECOND = {
    "single": "none",
    "paper": "Interventional and observational stream: a repair after SFT-1's wrong attempt and the verdict "
    "(the `repair` stage); SFT + oracle corrections: the plain prompt again (its greedy `single` answer, no new "
    "generation). Base, SFT-1, ReST, GRPO, DAPO: none",
    "retry": "every arm: a repair after its own wrong attempt and the verdict (`<method>_retry`; SFT-1's is the "
    "`repair` stage's SFT-1 arm)",
}
FIRST = {
    "single": "each arm's own, plain prompt",
    "paper": "SFT-1's for the three arms with a second attempt; each other arm its own",
    "retry": "each arm's own, plain prompt",
}


def _seed_cell(t: dict) -> str:
    return f"{t['only_a']} vs {t['only_b']}, p = {t['p_value']:.3g}"


def _claim_cell(c: dict) -> str:
    a, b = c["ours"]
    cell = f"{_pct(a)} vs {_pct(b)}: **{c['direction']}**"
    if len(c["seeds"]) > 1:
        cell += f" (same in {c['seeds_same']} of {len(c['seeds'])} seeds)"
    return cell + "; p " + ", ".join(f"{p:.2g}" for p in c["p_values"])


def protocol_markdown(res: dict, argv: str) -> list[str]:
    """The accuracy section: the three protocols, one table each, their McNemar tests and the
    direction of each of the paper's claims under each."""
    seeds, methods = res["seeds"], res["methods"]
    s0, multi = min(seeds), len(seeds) > 1
    L = [
        "## Held-out solve accuracy under three evaluation protocols",
        "",
        "The paper's interventional (85%) and SFT + oracle corrections (81%) rows are not single-shot: they add up "
        "as SFT-1's first attempt, kept when the verifier passes it, and a second attempt on the others "
        f"(63 + {PAPER_REPAIR['interventional']:.4f} × {PAPER_REPAIR['n']} = 85.0; docs/reference.md §2). Neither "
        "rule alone is fair (the paper's gives two arms the verifier at test time), so every arm is scored under "
        "three protocols, from the same generations where they coincide: the `single` first attempts are shared "
        "(SFT-1's serve `paper`, each arm's own serve `retry`), and only second attempts are new. A second attempt "
        "sees the question, the wrong attempt (its exact tokens), `Verdict: incorrect.` and a fresh `Proposed "
        "solution:` header, as a stream training row does, and is greedy. The paper's column is its published "
        "number in every table: its interventional and oracle rows were measured as `paper` measures them, its "
        "other rows single-shot (`single` and `paper` agree on those arms).",
        "",
        markdown_table(
            ["protocol", "rule", "first attempt", "second attempt, on a wrong verdict"],
            [[f"`{k}`", v, FIRST[k], SECOND[k]] for k, v in PROTOCOLS.items()],
        ),
        "",
    ]
    for name, by_seed in res["protocols_missing"].items():
        where = "; ".join(f"seed {s}: {', '.join(v)}" for s, v in by_seed.items())
        L += [
            f"**Protocol `{name}` is incomplete** ({where}): this run directory was written before those stages "
            f"existed, or is still running. Rerun `{argv}` on it: only the missing stages run.",
            "",
        ]
    for name, rule in PROTOCOLS.items():
        got = res["protocols"][name]
        if not got:
            continue
        first = seeds[s0]["protocols"][name]
        n_test = next(iter(first.values()))["n"] if first else 0
        header = ["method"] + (["trains on"] if name == "single" else []) + ["second attempts"]
        header.append(f"seed {s0} (n = {n_test}), Wilson 95%")
        if multi:
            header.append(f"mean over {len(seeds)} seeds [t 95%]; per seed")
        header.append("paper (Qwen2.5-0.5B, n = 100)")
        rows = []
        for m in methods:
            if m not in got:
                continue
            a = first.get(m)
            row = (
                [LABELS[m]]
                + ([TRAINS_ON[m]] if name == "single" else [])
                + [
                    a["second_attempts"] if a else "–",
                    f"{_pct(a['accuracy'])} {_ci(*a['wilson'])} ({a['solved']}/{a['n']})" if a else "–",
                ]
            )
            if multi:
                g = got[m]
                row.append(
                    f"{_pct(g['mean'])} {_ci(g['t_low'], g['t_high'])}; "
                    + ", ".join(f"{100 * v:.0f}" for v in g["per_seed"])
                )
            rows.append(row + [_pct(PAPER.get(m))])
        L += [f"### Protocol `{name}`", "", rule[0].upper() + rule[1:] + ".", "", markdown_table(header, rows), ""]
        tests = res["protocol_tests"][name]
        key = [f"{a} vs {b}" for a, b in KEY_PAIRS if f"{a} vs {b}" in tests]
        if key:
            cols = sorted({s for k in key for s in tests[k]})
            L += [
                f"Exact McNemar tests, `{name}` (`a vs b` = items solved by a only vs by b only, two-sided p):",
                "",
                markdown_table(
                    ["pair"] + [f"seed {s}" for s in cols],
                    [
                        [f"{LABELS[k.split(' vs ')[0]]} vs {LABELS[k.split(' vs ')[1]]}"]
                        + [_seed_cell(tests[k][s]) if s in tests[k] else "–" for s in cols]
                        for k in key
                    ],
                ),
                "",
            ]
        if name == "single":
            L += ["![accuracy](figures/accuracy.png)", ""]
    L += [
        "### The paper's claims under each protocol",
        "",
        "Each claim is a direction in the paper's table. Ours: "
        + ("the mean over seeds" if multi else f"seed {s0}")
        + "; **same**, **opposite** or **tie** against the paper's direction; then McNemar p per seed. "
        "Every pair's test is in results.json (`protocol_tests`).",
        "",
        markdown_table(
            ["claim (paper)"] + [f"`{k}`" for k in PROTOCOLS if res["claims"].get(k)],
            [
                [f"{LABELS[a]} > {LABELS[b]} ({_pct(PAPER[a])} vs {_pct(PAPER[b])})"]
                + [
                    next((_claim_cell(c) for c in res["claims"][k] if (c["a"], c["b"]) == (a, b)), "–")
                    for k in PROTOCOLS
                    if res["claims"].get(k)
                ]
                for a, b in CLAIMS
                if any((c["a"], c["b"]) == (a, b) for k in PROTOCOLS for c in res["claims"].get(k, []))
            ],
        ),
        "",
        "![protocols](figures/protocols.png)",
        "",
    ]
    return L


def render_markdown(res: dict, record: dict) -> str:
    cfg = res["config"] or {}
    seeds = res["seeds"]
    s0 = min(seeds)
    first = seeds[s0]
    methods = res["methods"]
    L = [f"# STEM comparison: {cfg.get('model')}, tools = {cfg.get('tools')}, preset `{res['preset']}`", ""]
    argv = "dostream " + " ".join(((record.get("environment") or {}).get("argv") or [""])[1:])
    L += [
        f"Reproduces the seed paper's STEM table (docs/reference.md §2) with dostream. Command: `{argv}`. "
        f"Seeds: {', '.join(map(str, seeds))}. Every number below is read from this run directory's stage "
        "files; `dostream report DIR` rebuilds this page.",
        "",
    ]
    L += protocol_markdown(res, argv)
    rep = first["repair"]
    if rep:
        L += [
            "## Stream-matched comparison",
            "",
            f"The {rep['n']} test questions where SFT-1's greedy first attempt is wrong. *Repair*: the arm sees the "
            "question, SFT-1's wrong attempt (its exact tokens), `Verdict: incorrect.` and a fresh `Proposed "
            "solution:` header, and answers greedily. *Plain*: the same questions from the plain prompt. "
            f"The paper reports repair on {PAPER_REPAIR['n']} questions: interventional 59.46%, SFT + oracle "
            "corrections 48.65%.",
            "",
        ]
        rrows = []
        for m, a in rep["arms"].items():
            p = a["plain"]
            rrows.append(
                [
                    LABELS[m],
                    f"{_pct(a['rate'])} {_ci(*a['wilson'])} ({a['solved']}/{rep['n']})",
                    f"{_pct(p['rate'])} {_ci(*p['wilson'])} ({p['solved']}/{rep['n']})" if p else "–",
                    _pct(PAPER_REPAIR.get(m)),
                ]
            )
        L += [markdown_table(["arm", "repair", "plain", "paper (repair)"], rrows), ""]
        if rep.get("tests"):
            L += [
                markdown_table(
                    ["repair pair (McNemar)", "only int.", "only other", "p"],
                    [[k, v["only_a"], v["only_b"], f"{v['p_value']:.3g}"] for k, v in rep["tests"].items()],
                ),
                "",
            ]
        L += ["![stream-matched](figures/stream_matched.png)", ""]
    L += [
        "## Token accounting (training data of each method)",
        "",
        "Loss-bearing positions are the supervised labels (for GRPO/DAPO: the sampled tokens that carry the policy "
        "gradient); context-only positions are in the rows but masked. Rows with no supervised token are dropped "
        "before training (the interventional arm's correct-first-attempt turns: no gradient either way).",
        "",
    ]
    trows = []
    for m in methods:
        t = first["tokens"].get(m)
        if not t:
            continue
        dropped = t.get("dropped_no_supervised", 0)
        trows.append(
            [
                LABELS[m],
                t.get("rows"),
                dropped,
                f"{t['supervised_tokens']:,}",
                f"{t['context_tokens']:,}",
                f"{100 * t['supervised_tokens'] / max(1, t['tokens']):.1f}%",
            ]
        )
    L += [
        markdown_table(
            ["method", "rows", "dropped (no supervised token)", "loss-bearing", "context only", "supervised share"],
            trows,
        ),
        "",
        "The paper: observational 51,121 of 81,131 positions supervised (63.0%), interventional 17,924 of 81,131 "
        "(22.1%; there the correct turns stay in the count).",
        "",
        "![tokens](figures/tokens.png)",
        "",
    ]
    st = first["stream"]
    if st:
        L += [
            "## The stream",
            "",
            f"The frozen SFT-1 model (temperature {cfg.get('temperature')}) attempted D_agent items until "
            f"{st['wrong']} wrong first attempts: {st['turns']} turns, {st['correct']} correct first attempts, "
            f"the wrong ones on {st['unique_wrong_questions']} distinct questions (paper: 785 turns, 385 correct, "
            "400 wrong on 70 questions).",
            "",
        ]
        L += [
            markdown_table(
                ["skill", "correct", "wrong"], [[k, v["correct"], v["wrong"]] for k, v in st["composition"].items()]
            ),
            "",
            "![composition](figures/stream_composition.png)",
            "",
        ]
    L += ["## Per skill", "", "![skills](figures/skills.png)", ""]
    skills = sorted({s for m in methods for s in first["accuracy"][m]["by_skill"]})
    L += [
        markdown_table(
            ["method"] + skills,
            [
                [LABELS[m]] + [f"{c}/{n}" for c, n in (first["accuracy"][m]["by_skill"].get(s, [0, 0]) for s in skills)]
                for m in methods
            ],
        ),
        "",
    ]
    L += ["## Method bookkeeping", ""]
    if first["rest"]:
        r = first["rest"]
        L += [
            f"- ReST: {r['samples']} samples, {r['passing']} verifier-passing, {r['passing_parseable']} parseable, "
            f"{r['duplicates']} duplicates, {r['selected']} selected (<= 1 per group; {r['groups_with_pass']} groups "
            "had a pass); + the D_sft replay rows. Paper: 400 samples, 30 selected, + 200 replay."
        ]
    for name in ("grpo", "dapo"):
        g = first[name]
        if g:
            L += [
                f"- {name.upper()}: {g['groups']} groups ({g['samples']} samples, mean reward {g['mean_reward']:.3f}); "
                f"{g['flat_groups']} flat ({g['flat_all_correct']} all correct, {g['flat_all_wrong']} all wrong); "
                f"{g['updates']} updates"
                + (
                    f", {g['dropped_groups']} groups dropped by dynamic sampling"
                    if name == "dapo"
                    else f", {g['skipped_steps']} steps skipped (all groups flat)"
                )
                + (". Paper (GRPO): 50 groups, 24 flat, 26 updates." if name == "grpo" else ".")
            ]
    steps = first["steps"]
    L += ["- Optimizer steps: " + ", ".join(f"{LABELS[m]} {v}" for m, v in steps.items() if v is not None), ""]
    L += ["## Wall time per stage", ""]
    secs = {s: seeds[s]["seconds"] for s in seeds}
    names = list(secs[s0])
    order = (
        ["data", "base_eval", "base_retry", "sft1", "sft1_eval", "stream"]
        + [n for m in methods[2:] for n in (m, f"{m}_eval", f"{m}_retry")]
        + ["repair"]
    )
    names = [n for n in order if n in names] + [n for n in names if n not in order]
    L += [
        markdown_table(
            ["stage"] + [f"seed {s} (s)" for s in secs],
            [[n] + [f"{secs[s].get(n, float('nan')):.0f}" for s in secs] for n in names]
            + [["total"] + [f"{sum(secs[s].values()):.0f}" for s in secs]],
        ),
        "",
    ]
    env = record.get("environment") or {}
    L += [
        "## Configuration",
        "",
        "```json",
        json.dumps(cfg, indent=1),
        "```",
        "",
        f"Environment: {json.dumps({k: env.get(k) for k in ('versions', 'python', 'platform', 'cpu_count', 'git_commit')})}",
        "",
    ]
    return "\n".join(L)


def write_report(out: str | Path) -> Path:
    out = Path(out)
    record = _load(out / "config.json")
    if not record or record.get("experiment") != "stem":
        raise RunDirError(f"{out}: not a STEM run directory (no config.json with experiment 'stem')")
    seeds = collect(out)
    if not seeds:
        raise RunDirError(f"{out}: no completed stages yet")
    res = summarise(record, seeds)
    for name, by_seed in res["protocols_missing"].items():
        stages = sorted({x for v in by_seed.values() for x in v})
        print(
            f"{out}: protocol {name} lacks stages {', '.join(stages)} (seeds {', '.join(map(str, by_seed))}): "
            "rerun the same `dostream reproduce stem` command on this directory; only those stages run",
            file=sys.stderr,
        )
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=float) + "\n")
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    first = res["seeds"][min(res["seeds"])]
    if res["methods"]:
        fig_accuracy(res, figs / "accuracy.png")
        fig_protocols(res, figs / "protocols.png")
        fig_skills(res, figs / "skills.png")
    if any(first["tokens"].values()):
        fig_tokens(res, figs / "tokens.png")
    if first["stream"]:
        fig_composition(res, figs / "stream_composition.png")
    if first["repair"] and first["repair"]["arms"]:
        fig_stream_matched(res, figs / "stream_matched.png")
    atomic_write_text(out / "report.md", render_markdown(res, record))
    return out / "report.md"
