"""Keep or restore: the candidate must answer the gate's checks about as well as the adapter in force. Knows no check's content.

A check is whatever the source can ask (a held-out environment item, a control conversation with
the strings a passing reply holds); the source's `ask(adapter, checks)` answers each greedily with
pass or fail. The gate asks both adapters and rejects a candidate whose success rate is more than
`tolerance` below the adapter in force: the previous adapter stays in force, the reason recorded.

>>> Gate(0.0).judge(["a", "b"], lambda adapter, cs: [adapter is None, True], None, "cand", ids=["a", "b"])[:2]
(False, 'gate success 0.50 vs 1.00 in force (n=2, tolerance 0.0): regression, previous adapter restored')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Ask = Callable[[str | None, Sequence[Any]], list[bool]]


@dataclass
class Gate:
    tolerance: float

    def judge(
        self,
        checks: Sequence[Any],
        ask: Ask,
        current: str | None,
        candidate: str,
        *,
        ids: Sequence[str] | None = None,
        control: int | None = None,
    ) -> tuple[bool, str, dict[str, Any]]:
        """(accepted, reason, the record: rates, n, and each check's before/after). `control`: how
        many of `checks` are the fixed control set (the rest: things already done well)."""
        if not checks:
            return True, "no gate (nothing to ask: no control set, nothing done well yet)", {}
        before, after = ask(current, checks), ask(candidate, checks)
        n, tol = len(checks), self.tolerance
        b, a = sum(before) / n, sum(after) / n
        accepted = a >= b - tol
        reason = f"gate success {a:.2f} vs {b:.2f} in force (n={n}, tolerance {tol})" + (
            "" if accepted else ": regression, previous adapter restored"
        )
        ids = list(ids) if ids is not None else [str(i) for i in range(n)]
        record = {
            "n": n,
            "control": n if control is None else control,
            "before": b,
            "after": a,
            "tolerance": tol,
            "checks": [{"id": c, "before": x, "after": y} for c, x, y in zip(ids, before, after)],
        }
        return accepted, reason, record
