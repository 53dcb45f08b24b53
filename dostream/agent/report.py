"""The continual-agent report, written from the run directories' stores (`dostream report DIR`).

`DIR/report.md` (tables with Wilson 95% intervals, the configuration, wall time),
`DIR/results.json` (every number in the report) and `DIR/success.png` (success over episodes,
rolling, and held-out success at each evaluation, per learner). For the support environment, the
report also probes the base model and each loop's final adapter for the services' rules
(`agent.probe.rule_probe`), cached in `DIR/probe.json` until an adapter or the number of probed
calls changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dostream.agent.store import Store
from dostream.config import RunDirError, atomic_write_text
from dostream.envs.registry import env_spec
from dostream.stats import environment_line, markdown_table, mcnemar, wilson

LABELS = {
    "interventional": "Interventional (world tokens supervised)",
    "observational": "Observational (agent tokens too)",
    "none": "No learning",
    "dapo": "DAPO (reward only)",
    "dual": "Dual LoRA (policy half: DAPO; world half: world tokens)",
    "dual-shared": "Dual losses, one shared adapter (no isolation)",
}
COLORS = {
    "interventional": "#1b7837",
    "observational": "#c51b7d",
    "none": "#777777",
    "dapo": "#e08214",
    "dual": "#2166ac",
    "dual-shared": "#8073ac",
}


def arm_names(record: dict[str, Any]) -> list[str]:
    """The learners a run record names (`views` in records written before there were learners)."""
    return list(record.get("learners") or record.get("views") or [])


def summarise_arm(arm: Path) -> dict[str, Any]:
    store = Store(arm / "store.sqlite", read_only=True)
    try:
        succ = [ok for _, ok, _ in store.successes()]
        evals = store.evals("heldout")
        ups = store.updates()
        informative = [u["metrics"].get("groups_informative") for u in ups]
        # Per-item held-out answers of the last evaluation are not stored; the counts are.
        n = len(succ)
        quarter = succ[-max(1, n // 4) :] if n else []
        timing = arm / "timing.json"
        return {
            "episodes": n,
            "successes": sum(succ),
            "curve": succ,
            "success_rate": sum(succ) / n if n else None,
            "success_ci": wilson(sum(succ), n),
            "last_quarter": {"n": len(quarter), "successes": sum(quarter), "ci": wilson(sum(quarter), len(quarter))},
            "first_quarter": (lambda q: {"n": len(q), "successes": sum(q), "ci": wilson(sum(q), len(q))})(
                succ[: max(1, n // 4)] if n else []
            ),
            "evals": [{**e, "ci": wilson(e["successes"], e["n"])} for e in evals],
            "updates": {
                "accepted": sum(u["accepted"] for u in ups),
                "rejected": sum(not u["accepted"] for u in ups),
                "rejections": [
                    {"after_episodes": u["after_episodes"], "reason": u["reason"]} for u in ups if not u["accepted"]
                ],
            },
            # reward learners: groups whose outcomes differed (the only ones DAPO learns from)
            "groups": {
                "informative": sum(x for x in informative if x is not None),
                "total": sum(u["metrics"].get("groups", 0) for u in ups),
            },
            "seconds": json.loads(timing.read_text())["seconds"] if timing.exists() else None,
            "adapter": store.current_adapter(),
            "config": json.loads((arm / "config.json").read_text())["config"],
        }
    finally:
        store.close()


PROBE_TASKS = 48


def _rule_probe(
    out: Path, cfg: dict[str, Any], reply: str, arms: dict[str, Any], n: int = PROBE_TASKS
) -> dict[str, Any]:
    """The rule probe of the support environment for the base model and every final adapter."""
    adapters = {v: a["adapter"] for v, a in arms.items() if a["adapter"]}
    path = out / "probe.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["adapters"] == adapters and cached.get("tasks", PROBE_TASKS) == n:
            return cached
    from dostream.agent.probe import rule_probe
    from dostream.envs.support import SupportWorld
    from dostream.models import load_model, load_tokenizer

    tok = load_tokenizer(cfg["model"])
    tasks = SupportWorld(cfg["seed"]).tasks("heldout", n, seed=cfg["seed"] * 2 + 7)  # not an eval's items
    models = {"base": rule_probe(load_model(cfg["model"]), tok, tasks, reply)}
    for view, adapter in adapters.items():
        models[view] = rule_probe(load_model(cfg["model"], adapter=out / view / adapter), tok, tasks, reply)
    probe = {"adapters": adapters, "tasks": n, "reply": reply, "models": models}
    atomic_write_text(path, json.dumps(probe, indent=1) + "\n")
    return probe


def _figure(res: dict[str, Any], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for view, a in res["arms"].items():
        curve = a["curve"]
        xs = list(range(window, len(curve) + 1))
        ys = [sum(curve[i - window : i]) / window for i in xs]
        ax1.plot(xs, ys, color=COLORS.get(view), label=LABELS.get(view, view))
        ex = [e["after_episodes"] for e in a["evals"]]
        ey = [e["successes"] / e["n"] for e in a["evals"]]
        lo = [y - e["ci"][0] for y, e in zip(ey, a["evals"])]
        hi = [e["ci"][1] - y for y, e in zip(ey, a["evals"])]
        ax2.errorbar(ex, ey, yerr=[lo, hi], color=COLORS.get(view), marker="o", capsize=3, label=LABELS.get(view, view))
    ax1.set(
        xlabel="episode",
        ylabel=f"success (mean of the last {window})",
        ylim=(-0.02, 1.02),
        title="Acting: success over the episode sequence",
    )
    ax2.set(
        xlabel="episodes seen",
        ylabel="held-out success (greedy)",
        ylim=(-0.02, 1.02),
        title="Held-out split (Wilson 95%)",
    )
    ax1.legend(loc="upper left", fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(k: int, n: int, ci: tuple[float, float]) -> str:
    return f"{k}/{n} = {k / n:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]" if n else "–"


def write_report(out: str | Path, window: int = 32) -> Path:
    out = Path(out)
    record = json.loads((out / "config.json").read_text())
    arms = {v: summarise_arm(out / v) for v in arm_names(record) if (out / v / "store.sqlite").exists()}
    if not arms:
        raise RunDirError(f"{out}: no arm has a store yet")
    cfg = record["config"]
    world = env_spec(cfg["env"], cfg["seed"]).describe  # the support world's rules; {} for other envs
    res = {
        "record": record,
        "arms": arms,
        "rule_probe": _rule_probe(out, cfg, world["reply"], arms, record.get("probe_tasks", PROBE_TASKS))
        if "rules" in world
        else None,
    }
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=float) + "\n")
    window = max(1, min(window, min(a["episodes"] for a in arms.values()) or 1))
    _figure(res, out / "success.png", window)

    rows = []
    for view, a in arms.items():
        first, last = a["evals"][0] if a["evals"] else None, a["evals"][-1] if a["evals"] else None
        rows.append(
            [
                LABELS.get(view, view),
                _pct(a["successes"], a["episodes"], a["success_ci"]),
                _pct(a["first_quarter"]["successes"], a["first_quarter"]["n"], a["first_quarter"]["ci"]),
                _pct(a["last_quarter"]["successes"], a["last_quarter"]["n"], a["last_quarter"]["ci"]),
                _pct(first["successes"], first["n"], first["ci"]) if first else "–",
                _pct(last["successes"], last["n"], last["ci"]) if last else "–",
                f"{a['updates']['accepted']} / {a['updates']['rejected']}",
                f"{a['seconds']:.0f}" if a["seconds"] is not None else "–",
            ]
        )
    lines = [
        f"# Continual agent: {cfg['env']} on {cfg['model']}",
        "",
        f"Command: `{record.get('command', 'dostream agent run')}`",
        "",
        "Every loop acts on the same seeded episode sequence (the same tasks in the same order; the "
        "samples differ because the adapters differ). Intervals are Wilson 95%.",
        "",
        markdown_table(
            [
                "loop",
                "success, all episodes",
                "first quarter",
                "last quarter",
                "held-out at start",
                "held-out at end",
                "updates accepted / rejected",
                "wall (s)",
            ],
            rows,
        ),
        "",
        "![success over episodes](success.png)",
        "",
    ]
    k = cfg.get("group_size", 1)
    if k > 1:
        lines += [
            f"Each call is played {k} times in a row (a group) by every loop. The reward learners learn "
            "only from groups whose outcomes differ (DAPO's dynamic sampling drops the others):",
            "",
        ]
        lines += [
            f"- {v}: {a['groups']['informative']} of {a['groups']['total']} groups informative"
            for v, a in arms.items()
            if a["groups"]["total"]
        ]
        lines.append("")
    if "none" in arms:
        lines += [
            "Acting success of each learning loop vs no learning, over the same episodes "
            "(exact McNemar on the paired episode outcomes; the samples differ, the tasks do not):",
            "",
        ]
        for view, a in arms.items():
            if view != "none" and a["episodes"] == arms["none"]["episodes"]:
                t = mcnemar([bool(x) for x in a["curve"]], [bool(x) for x in arms["none"]["curve"]])
                lines.append(
                    f"- {view}: {t['only_a']} episodes only it solved, {t['only_b']} only no-learning "
                    f"solved, p = {t['p_value']:.3g}"
                )
        lines.append("")
    both = [arms.get("interventional"), arms.get("observational")]
    if all(both) and both[0]["episodes"] == both[1]["episodes"]:
        t = mcnemar([bool(x) for x in both[0]["curve"]], [bool(x) for x in both[1]["curve"]])
        lines += [
            f"Interventional vs observational, same episodes: {t['only_a']} solved only by the interventional "
            f"loop, {t['only_b']} only by the observational one, p = {t['p_value']:.3g}.",
            "",
        ]
    if res["rule_probe"]:
        models = res["rule_probe"]["models"]
        lines += [
            f"Does the agent know the rules? On {res['rule_probe'].get('tasks', PROBE_TASKS)} fresh held-out calls, how often the detail the "
            "service requires is the likeliest of the six (mean log-prob of its words; chance 1/6) where the "
            'agent acts (after "I have ready the user\'s") and where the service speaks (after the start '
            f"of its reply, {res['rule_probe']['reply']} style):",
            "",
            markdown_table(
                ["model", "where the agent acts", "where the service speaks"],
                [
                    [
                        LABELS.get(m, m).split(" (")[0] if m != "base" else "Base model (no adapter)",
                        _pct(p["act"], p["n"], wilson(p["act"], p["n"])),
                        _pct(p["reply"], p["n"], wilson(p["reply"], p["n"])),
                    ]
                    for m, p in models.items()
                ],
            ),
            "",
        ]
    rejections = [(v, r) for v, a in arms.items() for r in a["updates"]["rejections"]]
    if rejections:
        lines += ["Rejected updates (the gate restored the previous adapter):", ""]
        lines += [f"- {v}, after {r['after_episodes']} episodes: {r['reason']}" for v, r in rejections]
        lines.append("")
    if "rules" in world:
        lines += [
            f"The world (seed {cfg['seed']}): what each service requires, and its held-out goal:",
            "",
            markdown_table(
                ["service", "requires", "held-out goal"],
                [[s, need, world["held_out_goals"][s]] for s, need in world["rules"].items()],
            ),
            "",
        ]
    arm_cfg = next(iter(arms.values()))["config"]
    lines += [
        "## Configuration",
        "",
        "```json",
        json.dumps({k: v for k, v in arm_cfg.items() if k not in ("view", "learner")}, indent=1),
        "```",
        "",
    ]
    env = record.get("environment", {})
    if env:
        lines += [environment_line(env), ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
