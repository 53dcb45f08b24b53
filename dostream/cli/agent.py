"""`dostream agent run`: the continual agent, one run directory per learner, and a report comparing them.

    dostream agent run --env support --model smollm2 --out runs/agent-support
    dostream agent run --learners dapo,dual,dual-shared,interventional,none --out runs/dual
    dostream agent run ... --resume          # continue an interrupted run where it stopped
    dostream report runs/agent-support       # rebuild the report from the stores

By default three loops run one after another on the same seeded episode sequence: the
interventional learner, the observational learner and no learning (`--learners` picks, in order;
`--learner` says the same, `--views` is its old, deprecated name). Each lives in `OUT/<learner>/`
(config, `store.sqlite`, adapters); `OUT/report.md`, `OUT/results.json` and `OUT/success.png`
compare them. Learners: interventional, observational, none, dapo, dual, dual-shared
(`dostream/learning/learners.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dostream.agent.loop import AgentConfig, run_learners
from dostream.cli._common import CliError, user_errors
from dostream.config import add_dataclass_args, from_args
from dostream.envs.registry import ENVS
from dostream.learning.config import DEFAULT_LEARNERS, LEARNER_HELP, LEARNERS


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dostream agent run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="run directory (one subdirectory per learner)")
    ap.add_argument(
        "--learners",
        "--learner",
        "--views",  # the old name, when the loops were views; kept so old commands run
        dest="learners",
        default=",".join(DEFAULT_LEARNERS),
        help="comma-separated learners to run, in order: "
        + "; ".join(f"{k}: {v}" for k, v in LEARNER_HELP.items())
        + f" (default: {','.join(DEFAULT_LEARNERS)})",
    )
    ap.add_argument("--resume", action="store_true", help="continue the runs stored in --out")
    ap.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    add_dataclass_args(ap, AgentConfig, skip=("learner",))
    return ap


def cli_main(argv: list[str]) -> int:
    if not argv or argv[0] != "run":
        print(
            f"usage: dostream agent run --env {'|'.join(ENVS)} --model NAME --out DIR [--learners L,...] [--resume] [...]\n"
            "       (`dostream agent run --help` lists every option)",
            file=sys.stderr if argv[:1] != ["--help"] else sys.stdout,
        )
        return 0 if argv[:1] in (["--help"], ["-h"]) else 2
    args = _parser().parse_args(argv[1:])
    if any(a == "--views" or a.startswith("--views=") for a in argv):
        print("dostream agent run: --views is deprecated, use --learners", file=sys.stderr)
    learners = [v.strip() for v in args.learners.split(",") if v.strip()]
    bad = [v for v in learners if v not in LEARNERS]
    if bad or not learners:
        raise CliError(f"--learners {args.learners!r}: each learner is one of {', '.join(LEARNERS)}")
    if len(set(learners)) != len(learners):
        raise CliError(f"--learners {args.learners!r}: a learner is named twice")
    out = Path(args.out)
    with user_errors():
        run_learners(
            from_args(AgentConfig, args),
            learners,
            out,
            resume=args.resume,
            record={"command": "dostream agent " + " ".join(argv)},
            log=lambda m: print(m, file=sys.stderr),
        )
    if not args.no_report:
        from dostream.agent.report import write_report

        print(write_report(out))
    return 0
