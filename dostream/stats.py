"""Intervals, paired tests and Markdown tables: what every report (reproductions, the agent) shows.

>>> wilson(42, 100)
(0.3279..., 0.5179...)
"""

from __future__ import annotations

import math
from typing import Any


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
    if len(a) != len(b):
        raise ValueError("McNemar needs paired answers to the same items")
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


def environment_line(env: dict[str, Any]) -> str:
    """A run record's environment (versions aside) as one report line."""
    return f"Environment: {', '.join(f'{k} {v}' for k, v in env.items() if isinstance(v, (str, int, float)))}"
