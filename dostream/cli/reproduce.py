"""`dostream reproduce EXPERIMENT --preset smoke|quick|paper [...]`: rerun a seed experiment.

Both reproductions work one way. An experiment is a library, `dostream/experiments/<name>/`:
`run.py` holds its config dataclass, `PRESETS` (named instances of it), `resolve_preset` and
`run(cfg, out, ...)`; `report.py` holds `write_report(out)`. This command picks a preset
(`--preset`), makes every config field a flag whose default is the preset's value (`--lr 1e-3`;
`--set lr=1e-3` says the same), runs seeds 0..N-1 (`--seeds N`) in the run directory `--out` and
writes the report (`--no-report` skips it, `--report-only` only rewrites it). Rerunning a run
directory resumes it from its cached stages; a run directory with another config is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from pathlib import Path
from typing import Any

from dostream.cli._common import CliError, user_errors
from dostream.config import RunDirError, add_dataclass_args, set_argv

EXPERIMENTS = {
    "stem": "the seed paper's STEM comparison: seven methods, one verifier, held-out accuracy",
    "delusion": "interventional vs standard SFT on tutoring dialogues, seen and held-out facts",
    "dual-lora": "the continual agent's learners on support calls: reward only, world model, dual LoRA",
    "memory": "notes the world taught vs weights vs both, consolidation, and an agent-trusting memory (issue 34)",
}
PRESET_HELP = {
    "stem": "smoke: every method for a few steps on a tiny model (CI); quick: SmolLM2-135M in about "
    "17 min per seed on 2 CPU cores; paper: the paper's sizes (~50-60 min per seed on 2 cores)",
    "delusion": "smoke (tiny model, CI), quick (smollm2 LoRA, ~20 min on 2 cores), paper (the notebook's settings: "
    "smollm2 fully fine-tuned, 480 dialogues x 4 epochs at batch 1; ~70 min per seed on 2 cores)",
    "dual-lora": "smoke (tiny model, CI), quick (smollm2, every learner, support-framed, 3 seeds: ~25 min on 2 cores)",
    "memory": "smoke (tiny model, CI), quick (smollm2, every arm, the discount rule and the airline policy, 3 seeds)",
}
DEFAULT_OUT = {
    "stem": "runs/stem-PRESET-TOOLS",
    "delusion": "runs/delusion-PRESET",
    "dual-lora": "runs/dual-lora-PRESET",
    "memory": "runs/memory-PRESET",
}


def _module(name: str, part: str) -> Any:
    """`dostream.experiments.<name>.<part>` (a hyphen in the command is an underscore in the package)."""
    return importlib.import_module(f"dostream.experiments.{name.replace('-', '_')}.{part}")


def _default_out(name: str, preset: str, cfg: Any) -> Path:
    return Path(DEFAULT_OUT[name].replace("PRESET", preset).replace("TOOLS", getattr(cfg, "tools", "")))


def _parse(name: str, module: Any, argv: list[str]) -> tuple[argparse.Namespace, Any]:
    """The experiment's flags, with the chosen preset's values as defaults; returns (args, config)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="quick")
    chosen = module.PRESETS.get(pre.parse_known_args(argv)[0].preset, module.PRESETS["quick"])
    cls = type(chosen)
    fields = [f.name for f in dataclasses.fields(cls)]
    ap = argparse.ArgumentParser(prog=f"dostream reproduce {name}", description=module.__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=tuple(module.PRESETS), default="quick", help=PRESET_HELP[name])
    if "seeds" not in fields:  # otherwise a config field, and a flag like the others
        ap.add_argument(
            "--seeds", type=int, default=1, help="run seeds 0..N-1 (each draws its own data, inits and samples)"
        )
    ap.add_argument("--out", default=None, help=f"run directory (default: {DEFAULT_OUT[name]})")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one config field, as its flag does (--set n_test=50 is --n-test 50)",
    )
    ap.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from the stored stage results")
    add_dataclass_args(ap, cls, defaults=chosen)
    args = ap.parse_args(argv)
    if args.set:
        try:
            args = ap.parse_args([*argv, *set_argv(cls, args.set)])  # later flags win
        except ValueError as e:
            raise CliError(str(e)) from e
    return args, module.resolve_preset(args.preset, **{k: getattr(args, k) for k in fields})


def _usage(argv: list[str]) -> int:
    asked = bool(argv) and argv[0] in ("-h", "--help")
    width = max(map(len, EXPERIMENTS))
    print(
        "usage: dostream reproduce EXPERIMENT [--preset smoke|quick|paper] [--seeds N] [--out DIR] [...]",
        "",
        "experiments:",
        *(f"  {k:<{width}}  {v}" for k, v in EXPERIMENTS.items()),
        "",
        "`dostream reproduce EXPERIMENT --help` lists every option.",
        sep="\n",
        file=sys.stdout if asked else sys.stderr,
    )
    return 0 if asked else 2


def cli_main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXPERIMENTS:
        return _usage(argv)
    name = argv[0]
    module = _module(name, "run")
    args, cfg = _parse(name, module, argv[1:])
    out = Path(args.out) if args.out else _default_out(name, args.preset, cfg)
    seeds = cfg.seeds if hasattr(cfg, "seeds") else args.seeds
    if seeds < 1:
        raise CliError("--seeds must be >= 1")
    if not args.report_only:
        with user_errors():  # an unusable --out (a file in the way, no permission) is the user's to fix
            out.mkdir(parents=True, exist_ok=True)
    try:
        if not args.report_only:
            t0 = time.perf_counter()
            if name == "stem":  # stage log on stderr
                module.run(
                    cfg, out, preset=args.preset, seeds=seeds, log=lambda m: print(m, file=sys.stderr, flush=True)
                )
            else:  # stage log on stdout
                module.run(cfg, out, args.preset)
            print(f"dostream reproduce {name}: {seeds} seed(s) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if not args.no_report:
            report = _module(name, "report").write_report(out)
            print(f"dostream reproduce {name}: report {report}, results {out / 'results.json'}")
    except RunDirError as e:
        raise CliError(str(e)) from e
    return 0
