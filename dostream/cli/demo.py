"""`dostream demo [--model NAME] [--out DIR]`: the rule at work on the embedded model, in a few minutes.

Shows what each view supervises in a stream where the Agent's own answer is wrong and the User
corrects it; trains two LoRA adapters from the same start on the same rows (interventional:
the Agent's turns masked; observational: supervised); then asks both, and the untrained model,
about every trained fact in words the training never used, and prints how often each prefers its
earlier wrong claim, the mean log-probability margin of the true claim, and their greedy answers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from dostream.cli._common import CliError, user_errors
from dostream.config import add_dataclass_args, atomic_write_text, from_args
from dostream.experiments.demo import ARMS, PROBE_ASK, DemoConfig, dialogues, run_demo

NEXT = """Next:
  dostream reproduce delusion --preset quick                         # this effect over seeds, with held-out facts (~20 min)
  dostream reproduce stem --preset quick --tools calculator          # the seed paper's STEM comparison (~17 min)
  dostream import LOGS.jsonl --assistant other --out streams.jsonl   # your own logs as streams
  dostream serve --model smollm2 --store runs/serve                  # be the agent's endpoint"""


def _listing(stream, tok) -> str:
    """Each segment with its author and whether each view supervises it."""
    from dostream.render import Renderer

    r = Renderer(tok).render(stream)
    sup = {arm: r.supervised(view) for arm, view in ARMS.items()}
    lines = [f"{'interventional':<16}{'observational':<16}{'author':<10}text"]
    for seg in r.segments:
        idx = [i for i, o in enumerate(r.offsets) if o is not None and seg["start"] <= o[0] < seg["end"]]
        tags = []
        for arm in ARMS:
            flags = [sup[arm][i] for i in idx]
            tags.append("LOSS" if flags and all(flags) else "mask" if not any(flags) else "part")
        text = r.text[seg["start"] : seg["end"]].replace("\n", "⏎")
        if text.strip("⏎ "):
            lines.append(f"{tags[0]:<16}{tags[1]:<16}{seg['author']:<10}{text}")
    return "\n".join(lines)


def _table(res: dict) -> str:
    models = ["base", *ARMS]
    names = {"base": "untrained", "interventional": "interventional", "observational": "observational"}
    n = res["models"]["base"]["n"]
    rows = [
        ("prefers its wrong claim (Δ < 0)", lambda m: f"{m['prefers_false']}/{n}"),
        ("mean Δ = log p(true) − log p(wrong)", lambda m: f"{m['mean_delta']:+.3f}"),
        ("greedy answer names the truth", lambda m: f"{m['answers']['truth']}/{n}"),
        ("greedy answer names the wrong claim", lambda m: f"{m['answers']['lie']}/{n}"),
        ("greedy answer names neither", lambda m: f"{m['answers']['neither']}/{n}"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    out = [f"{'':<{width}}" + "".join(f"{names[m]:>16}" for m in models)]
    out += [f"{label:<{width}}" + "".join(f"{cell(res['models'][m]):>16}" for m in models) for label, cell in rows]
    return "\n".join(out)


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dostream demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="directory for the two adapters and demo.json")
    add_dataclass_args(p, DemoConfig)
    args = p.parse_args(argv)
    with user_errors():
        cfg = from_args(DemoConfig, args)
        from dostream.models import load_tokenizer

        tok = load_tokenizer(cfg.model)
        streams = dialogues(cfg)
    out = Path(args.out)
    for arm in ARMS:  # the demo's own earlier adapters are replaced, nothing else
        record = out / arm / "config.json"
        if record.exists():
            if json.loads(record.read_text()).get("config", {}).get("view") != ARMS[arm]:
                raise CliError(f"{out / arm} holds another run; choose another --out")
            shutil.rmtree(out / arm)
    say = lambda s="": print(s, file=sys.stderr, flush=True)
    say(
        "1. One training stream: the Agent answers wrongly (its turn is authored `agent`), the User corrects it.\n"
        "   What each view trains on (LOSS: a target; mask: context only):\n"
    )
    shown = next((s for s in streams if s.meta["mode"] == "ask"), streams[0])
    say(_listing(shown, tok))
    say(f"\n2. Two adapters from the same start on the same {len(streams)} streams ({cfg.n_facts} facts):\n")
    with user_errors():
        res = run_demo(cfg, out, tok=tok, log=say)
    atomic_write_text(out / "demo.json", json.dumps(res, indent=1) + "\n")
    first = {m: res["models"][m]["records"][0] for m in res["models"]}
    topic = first["base"]["topic"]
    print(
        f"\n3. Asked about each of the {cfg.n_facts} trained facts in words the training never used "
        f'("{PROBE_ASK.format(topic="<topic>")}"):\n'
    )
    print(_table(res))
    print(f'\n"{PROBE_ASK.format(topic=topic)}" (greedy):')
    for m, r in first.items():
        print(f"  {m:<15} {r['answer']!r}")
    steps = res["training"]["interventional"]["steps"]
    print(
        f"\n{steps} optimizer steps per adapter; {res['seconds'] / 60:.1f} min in all. "
        f"Every number: {out / 'demo.json'}.\n\n{NEXT}"
    )
    return 0
