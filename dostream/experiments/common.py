"""What every reproduction shares: cached stages, intervals, and report tables.

A reproduction is a sequence of named stages; each writes its result under
`RUN/stages/<name>/` and marks it complete with `result.json` (written last, atomically). Rerunning
the command skips complete stages, so an interrupted run resumes where it stopped, and the report
is rebuilt from the stored results by a separate step.

>>> wilson(42, 100)
(0.3279..., 0.5179...)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from dostream.config import atomic_write_text


class Stages:
    """Run-directory stage cache: `stages.run("sft1", fn)` calls `fn(stage_dir)` once, stores
    the JSON-able value it returns, and returns the stored value on every later call."""

    def __init__(self, run_dir: str | Path, *, log: Callable[[str], None] = print):
        self.root = Path(run_dir) / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, name: str) -> bool:
        return (self.root / name / "result.json").exists()

    def result(self, name: str) -> Any:
        return json.loads((self.root / name / "result.json").read_text())["value"]

    def run(self, name: str, fn: Callable[[Path], Any]) -> Any:
        if self.done(name):
            self.log(f"[{name}] cached")
            return self.result(name)
        self.log(f"[{name}] running")
        t = time.perf_counter()
        value = fn(self.dir(name))
        seconds = time.perf_counter() - t
        atomic_write_text(self.root / name / "result.json",
                          json.dumps({"value": value, "seconds": seconds}, indent=1, default=float) + "\n")
        self.log(f"[{name}] done in {seconds:.0f} s")
        return value

    def seconds(self, name: str) -> float:
        return json.loads((self.root / name / "result.json").read_text())["seconds"]


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and a Student-t interval over seeds: (mean, low, high). One value gives (v, nan, nan)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return (mean, float("nan"), float("nan"))
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def mcnemar(a: list[bool], b: list[bool]) -> dict[str, float]:
    """Exact McNemar test for two arms answering the same items: counts of discordant pairs and
    the two-sided binomial p-value."""
    assert len(a) == len(b), "McNemar needs paired answers to the same items"
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    k = min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": p}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
