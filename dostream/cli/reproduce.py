"""`dostream reproduce EXPERIMENT --preset smoke|quick|paper [...]`: rerun a seed experiment.

Each experiment lives in `dostream/experiments/<name>/`; its `run.py` has its `cli_main(argv)`.
"""

from __future__ import annotations

import importlib
import sys

EXPERIMENTS = {
    "stem": "the seed paper's STEM comparison: seven methods, one verifier, held-out accuracy",
    "delusion": "interventional vs standard SFT on tutoring dialogues, seen and held-out facts",
}


def cli_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in EXPERIMENTS:
        width = max(map(len, EXPERIMENTS))
        print(
            "usage: dostream reproduce EXPERIMENT [--preset smoke|quick|paper] [...]\n\nexperiments:",
            *(f"  {k:<{width}}  {v}" for k, v in EXPERIMENTS.items()),
            sep="\n",
            file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(f"dostream.experiments.{argv[0]}.run").cli_main(argv[1:]) or 0)
