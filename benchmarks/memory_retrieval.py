"""Retrieval over a large memory: the time `memory.retrieve` takes to return the 4 notes for a
situation, over 100,000 notes (the issue's bar: <= 10 ms p50 on the 2-core machine).

    python benchmarks/memory_retrieval.py [--notes 100000] [--queries 300] [--k 4] [--json OUT]

The memory is a file (`Memory.open_dir`, the FTS5 index in the same file as the notes), filled
with synthetic notes of the support world's shape ("Pinecrest Water asks for the billing ZIP code
before a refund.": service x detail x action x phrasing, each note with one world-authored evidence
span). While it is built the connection runs with `PRAGMA synchronous=OFF` (a build of 100,000
one-note transactions would otherwise wait on 100,000 fsyncs); retrieval is measured with the
memory reopened as it is served. Queries are situations the way an episode opens ("Calling
Pinecrest Water about a refund: which detail do they need?"), services and actions drawn at random,
so most match hundreds of notes; each query is timed alone (`retrieve`: the FTS5 bm25 search and
reading the notes it returns with their evidence and counters). Reports p50/p90/p99 and the mean
with its t 95% interval.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dostream.config import environment
from dostream.memory.retrieve import retrieve
from dostream.memory.store import Cite, Memory
from dostream.stats import mean_ci
from dostream.stream import Segment, Stream

SYLLABLES = "pine crest river stone oak bright north lake sun field harbor maple cedar silver iron glen".split()
KINDS = "Water Power Health Bank Mobile Insurance Travel Energy Telecom Transit".split()
DETAILS = [
    "billing ZIP code",
    "account number",
    "date of birth",
    "policy number",
    "last four digits of the card",
    "postcode",
]
ACTIONS = ["a refund", "a new contract", "a change of address", "a complaint", "closing the account", "a payment plan"]
PHRASES = [
    "{s} asks for the {d} before {a}.",
    "For {a}, {s} needs the {d}.",
    "{s} will not discuss {a} without the {d}.",
    "Have the {d} ready when calling {s} about {a}.",
]


def service(rng: random.Random) -> str:
    return (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize() + " " + rng.choice(KINDS)


def build(path: Path, n: int, seed: int) -> float:
    rng = random.Random(seed)
    mem = Memory.open_dir(path)
    mem.db.execute("PRAGMA synchronous=OFF")  # the build only (see the docstring)
    t0 = time.perf_counter()
    for i in range(n):
        text = rng.choice(PHRASES).format(s=service(rng), d=rng.choice(DETAILS), a=rng.choice(ACTIONS))
        world = Stream(f"told-{i}", [Segment("environment", text)])
        mem.add(text, "extractive", evidence=[Cite(world, 0)])
        if (i + 1) % 10000 == 0:
            print(f"built {i + 1} notes, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    mem.close()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--notes", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dostream-memory-bench-") as d:
        built = build(Path(d), args.notes, args.seed)
        mem = Memory.open_dir(d)
        rng = random.Random(args.seed + 1)
        situations = [
            f"Calling {service(rng)} about {rng.choice(ACTIONS)}: which detail do they need?"
            for _ in range(args.queries)
        ]
        retrieve(mem, situations[0], args.k)  # warm-up (the first query reads the index from disk)
        times, found = [], []
        for s in situations:
            t = time.perf_counter()
            notes = retrieve(mem, s, args.k)
            times.append(time.perf_counter() - t)
            found.append(len(notes))
        size = sum(p.stat().st_size for p in Path(d).iterdir())
        mem.close()
    ms = sorted(1e3 * t for t in times)
    m, lo, hi = mean_ci(ms)
    q = {p: ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))] for p in (50, 90, 99)}
    print(
        "| notes | queries | k | p50 (ms) | p90 (ms) | p99 (ms) | mean [t 95%] (ms) | notes returned (mean) | build (s) | file (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.notes} | {args.queries} | {args.k} | {q[50]:.2f} | {q[90]:.2f} | {q[99]:.2f} | "
        f"{m:.2f} [{lo:.2f}, {hi:.2f}] | {statistics.mean(found):.2f} | {built:.0f} | {size / 1e6:.0f} |"
    )
    machine = environment()
    print(f"\n{machine['cpu']}, {machine['cpu_count']} CPUs, Python sqlite3 {__import__('sqlite3').sqlite_version}")
    if args.json:
        record = {"environment": machine, "settings": vars(args), "ms": ms, "p50": q[50], "p90": q[90], "p99": q[99]}
        record.update(mean=m, ci=[lo, hi], build_s=built, file_bytes=size)
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
