"""`dostream stem`: generate problem rows, verify completions (JSON lines on stdout).

    dostream stem generate --split sft --n 200 --seed 0 > sft.jsonl
    dostream stem verify --input rows.jsonl

`verify` reads rows `{"id", "problem": <problem row>, "completion": str}` and prints one
`{"id", "correct", "answer", "unit", "marked", "reason"}` per row. A bad row is reported on stderr with its
file and line, the other rows are still verified, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from dostream.cli._common import CliError, user_errors
from dostream.envs.stem import SPLIT_SIZES, SPLITS, Problem, generate, verify


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dostream stem", description="STEM problems: generate rows, verify completions."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="print N problem rows of a split as JSON lines")
    gen.add_argument("--split", choices=SPLITS, required=True, help="which split; splits never share a question")
    sizes = ", ".join(f"{k} {v}" for k, v in SPLIT_SIZES.items())
    gen.add_argument("--n", type=_count, default=None, help=f"number of problems (default: {sizes})")
    gen.add_argument("--seed", type=int, default=0, help="random seed (same seed, same rows)")
    ver = sub.add_parser("verify", help="grade completions: one verdict per input row")
    ver.add_argument("--input", required=True, help='JSONL rows {"id", "problem", "completion"}; - for stdin')
    return parser


def _verify_file(path: str) -> int:
    name = "<stdin>" if path == "-" else path
    errors = 0
    try:
        f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    except OSError as e:
        raise CliError(f"cannot read {name}: {e.strerror}") from e
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                if not isinstance(row.get("completion"), str):
                    raise ValueError("field 'completion': expected a string")
                problem = Problem.from_json(row.get("problem"))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                print(f"{name}:{lineno}: {e}", file=sys.stderr)
                errors += 1
                continue
            verdict = verify(problem, row["completion"])
            print(json.dumps({"id": row.get("id"), **verdict.to_json()}, ensure_ascii=False))
    return 1 if errors else 0


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        with user_errors(prefix="--n: "):
            problems = generate(args.split, args.n, args.seed)
        for p in problems:
            print(json.dumps(p.to_json(), ensure_ascii=False))
        return 0
    return _verify_file(args.input)
