"""The STEM reproduction's numbers, from the run directory's files: every stage's stored result
per seed (`collect`), each arm's answers under the three evaluation protocols
(`protocol_answers`), and everything the report shows (`summarise`: per seed, over seeds,
McNemar tests, the direction of the paper's claims). `report.py` writes them out.
"""

from __future__ import annotations

import json
from pathlib import Path

from dostream.config import RunDirError
from dostream.experiments.stem.paper import CLAIMS, METHODS, PAPER, PAPER_REPAIR, PAPER_SECOND, PROTOCOLS
from dostream.stats import mcnemar, mean_ci, wilson

PAPER_TOKENS = {"observational": (51121, 81131), "interventional": (17924, 81131)}


def read_json(path: Path):
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
