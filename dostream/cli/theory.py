"""`dostream theory [--seeds N] [--steps T] [--seed S] [--out DIR] [--json] ...`: the rule, computed exactly.

Prints the three results of `dostream/theory.py` (Bayes under intervention, self-delusion, the
prediction lemma) and writes `OUT/theory.png` and `OUT/theory.json`. Every `TheoryConfig` field
is an option.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dostream.cli._common import user_errors
from dostream.config import add_dataclass_args, from_args
from dostream.theory import TheoryConfig, plot_delusion, run_theory, summary


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dostream theory", description=__doc__.split("\n\n")[0])
    add_dataclass_args(parser, TheoryConfig)
    parser.add_argument("--out", type=Path, default=Path("runs/theory"), help="folder for theory.png and theory.json")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of text")
    args = parser.parse_args(argv)
    with user_errors():
        cfg = from_args(TheoryConfig, args)
    results = run_theory(cfg)
    with user_errors():
        figure = plot_delusion(results, args.out / "theory.png")
        results["figure"] = str(figure)
        (args.out / "theory.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results) if args.json else f"{summary(results)}\n\nfigure: {figure}")
    return 0
