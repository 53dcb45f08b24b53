"""The delusion experiment's numbers, from the run directory's stage results: every probe record
summarised per model, fact set, scorer and seed (`collect`), and each published claim
(docs/reference.md §1) beside what the run found (`claims`). `report.py` writes them out.
"""

from __future__ import annotations

import json
from pathlib import Path

from dostream.experiments.delusion.probes import DELTA_KEY, SCORERS, SETS, summarise
from dostream.experiments.delusion.run import ARMS, PUBLISHED
from dostream.experiments.stages import Stages
from dostream.stats import mean_ci

# The published claims (docs/reference.md §1, seen facts), each with the direction it asserts:
# (key, claim, published value, what is measured, sign the published direction needs).
CLAIMS = (
    ("standard_delta", "standard SFT: mean Δ", PUBLISHED["standard"]["mean_delta"], "delta:standard", -1),
    (
        "interventional_delta",
        "interventional SFT: mean Δ",
        PUBLISHED["interventional"]["mean_delta"],
        "delta:interventional",
        +1,
    ),
    (
        "delta_gap",
        "interventional − standard: mean Δ",
        PUBLISHED["interventional"]["mean_delta"] - PUBLISHED["standard"]["mean_delta"],
        "delta:paired",
        +1,
    ),
    (
        "standard_lie",
        "standard SFT: share of facts preferring the lie (published direction: a majority)",
        PUBLISHED["standard"]["prefers_lie"] / PUBLISHED["standard"]["n"],
        "share:standard",
        +1,
    ),
    (
        "interventional_lie",
        "interventional SFT: share of facts preferring the lie (published direction: a minority)",
        PUBLISHED["interventional"]["prefers_lie"] / PUBLISHED["interventional"]["n"],
        "share:interventional",
        -1,
    ),
    (
        "lie_gap",
        "interventional − standard: share of facts preferring the lie",
        PUBLISHED["interventional"]["prefers_lie"] / PUBLISHED["interventional"]["n"]
        - PUBLISHED["standard"]["prefers_lie"] / PUBLISHED["standard"]["n"],
        "share:paired",
        -1,
    ),
)


def _scorers(probes: dict[str, list[list[dict]]]) -> list[str]:
    """The scorers every probe record holds (runs before the notebook scorer hold only dostream's)."""
    records = [r for runs in probes.values() for rs in runs for r in rs]
    return [s for s in SCORERS if all(DELTA_KEY[s] in r for r in records)]


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
    scorers = _scorers(probes)
    summary = {
        sc: {m: {name: [summarise(rs, name, sc) for rs in runs] for name in SETS} for m, runs in probes.items()}
        for sc in scorers
    }
    per_seed = {
        str(s): {a: {sc: {name: summary[sc][a][name][k] for name in SETS} for sc in scorers} for a in ARMS}
        for k, s in enumerate(seeds)
    }
    per_fact = {sc: {} for sc in scorers}
    for sc in scorers:
        for m, runs in probes.items():
            table = per_fact[sc].setdefault(m, {})
            for rs in runs:
                for r in rs:
                    table.setdefault(f"{r['set']}/{r['topic']}", []).append(r[DELTA_KEY[sc]])
    paired = {
        sc: {
            name: [
                i["mean_delta"] - s["mean_delta"]
                for i, s in zip(summary[sc]["interventional"][name], summary[sc]["standard"][name])
            ]
            for name in SETS
        }
        for sc in scorers
    }
    timing = {
        p.name: json.loads((p / "result.json").read_text())["seconds"]
        for p in sorted((out / "stages").iterdir())
        if (p / "result.json").exists()
    }
    training = {f"{a}-s{s}": stages.result(f"train-{a}-s{s}") for a in ARMS for s in seeds}
    for key, value in training.items():  # the precision train() chose is recorded beside its weights
        rec = out / "stages" / f"train-{key}" / "train" / "config.json"
        value["bf16"] = json.loads(rec.read_text()).get("bf16") if rec.exists() else None
    checks = {}
    for s in seeds:
        runs = [training[f"{a}-s{s}"] for a in ARMS]
        order = stages.result(f"order-s{s}") if stages.done(f"order-s{s}") else {}
        checks[str(s)] = {
            "init_sha256": {a: training[f"{a}-s{s}"].get("init_sha256") for a in ARMS},
            "order_sha256": {a: training[f"{a}-s{s}"].get("order_sha256") for a in ARMS},
            "shared_order_sha256": order.get("order_sha256"),
            "steps": {a: training[f"{a}-s{s}"]["steps"] for a in ARMS},
            "same": all(r.get("init_sha256") and r.get("init_sha256") == runs[0].get("init_sha256") for r in runs)
            and all(r.get("order_sha256") and r.get("order_sha256") == order.get("order_sha256") for r in runs),
        }
    first = next(iter(probes.values()))[0] if probes else []
    notebook_blind = {
        name: sum(bool(r.get("notebook_drops_difference")) for r in first if r["set"] == name) for name in SETS
    }
    res = {
        "experiment": "delusion",
        "preset": record.get("preset"),
        "config": cfg,
        "seeds": seeds,
        "scorers": scorers,
        "scorer_help": {sc: SCORERS[sc] for sc in scorers},
        "summary": summary,
        "per_seed": per_seed,
        "paired": paired,
        "per_fact": per_fact,
        "notebook_blind": notebook_blind,
        "probes": probes,
        "timing": timing,
        "training": training,
        "checks": checks,
        "published": PUBLISHED,
        "environment": record.get("environment", {}),
    }
    res["claims"] = claims(res)
    return res


def _measure(res: dict, scorer: str, what: str) -> list[float]:
    """One value per seed of a claim's measure on the seen facts."""
    kind, model = what.split(":")
    seen = {m: res["summary"][scorer][m]["seen"] for m in ARMS}
    if kind == "delta":
        return res["paired"][scorer]["seen"] if model == "paired" else [r["mean_delta"] for r in seen[model]]
    share = {m: [r["prefers_lie"] / r["n"] for r in runs] for m, runs in seen.items()}
    if model == "paired":
        return [i - s for i, s in zip(share["interventional"], share["standard"])]
    return share[model]


def claims(res: dict) -> list[dict]:
    """Each published claim beside what this run found, per scorer: mean over seeds, interval, and
    whether (and on how many seeds) it points the published way."""
    out = []
    for key, text, published, what, sign in CLAIMS:
        found = {}
        for sc in res["scorers"]:
            values = _measure(res, sc, what)
            if not values:
                continue
            # A share's direction is about a majority (0.5), a Δ's and a gap's about zero.
            ref = 0.5 if what.startswith("share:") and not what.endswith("paired") else 0.0
            m, lo, hi = mean_ci(values)
            found[sc] = {
                "values": values,
                "mean": m,
                "ci": [lo, hi] if len(values) > 1 else None,
                "as_published": (m - ref) * sign > 0,
                "seeds_as_published": sum((v - ref) * sign > 0 for v in values),
            }
        out.append({"key": key, "claim": text, "measure": what, "published": published, "found": found})
    return out
