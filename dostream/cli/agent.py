"""`dostream agent run`: the continual agent, one run directory per view, and a report comparing them.

    dostream agent run --env support --model smollm2 --out runs/agent-support
    dostream agent run ... --resume          # continue an interrupted run where it stopped
    dostream report runs/agent-support       # rebuild the report from the stores

By default three loops run one after another on the same seeded episode sequence: the
interventional view, the observational view and no learning (`--views` picks). Each lives in
`OUT/<view>/` (config, `store.sqlite`, adapters); `OUT/report.md`, `OUT/results.json` and
`OUT/success.png` compare them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dostream.agent.loop import LOOPS, AgentConfig, run
from dostream.cli._common import CliError, user_errors
from dostream.config import add_dataclass_args, check_run_dir, from_args, write_run_record
from dostream.envs.registry import ENVS


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dostream agent run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="run directory (one subdirectory per view)")
    ap.add_argument(
        "--views", default=",".join(LOOPS), help=f"comma-separated loops to run, in order (default: {','.join(LOOPS)})"
    )
    ap.add_argument("--resume", action="store_true", help="continue the runs stored in --out")
    ap.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    add_dataclass_args(ap, AgentConfig, skip=("view",))
    return ap


def cli_main(argv: list[str]) -> int:
    if not argv or argv[0] != "run":
        print(
            f"usage: dostream agent run --env {'|'.join(ENVS)} --model NAME --out DIR [--resume] [...]\n"
            "       (`dostream agent run --help` lists every option)",
            file=sys.stderr if argv[:1] != ["--help"] else sys.stdout,
        )
        return 0 if argv[:1] in (["--help"], ["-h"]) else 2
    args = _parser().parse_args(argv[1:])
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    bad = [v for v in views if v not in LOOPS]
    if bad or not views:
        raise CliError(f"--views {args.views!r}: each view is one of {', '.join(LOOPS)}")
    out = Path(args.out)
    with user_errors():
        base = from_args(AgentConfig, args)
        check_run_dir(out, base, experiment="agent", resume=args.resume, may_change=("episodes", "progress"))
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, base, {"views": views, "command": "dostream agent " + " ".join(argv)}, experiment="agent")
    for view in views:
        cfg = from_args(AgentConfig, args, view=view)
        arm = out / view
        print(f"== {view} ({arm})", file=sys.stderr)
        with user_errors():
            summary = run(cfg, arm, resume=args.resume)
        print(
            f"== {view}: {summary['successes']}/{summary['episodes']} episodes succeeded, "
            f"{sum(u['accepted'] for u in summary['updates'])}/{len(summary['updates'])} updates accepted, "
            f"{summary['seconds']:.0f} s",
            file=sys.stderr,
        )
    if not args.no_report:
        from dostream.agent.report import write_report

        print(write_report(out))
    return 0
