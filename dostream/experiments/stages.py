"""What every reproduction shares: cached stages.

A reproduction is a sequence of named stages; each writes its result under
`RUN/stages/<name>/` and marks it complete with `result.json` (written last, atomically). Rerunning
the command skips complete stages, so an interrupted run resumes where it stopped, and the report
is rebuilt from the stored results by a separate step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        atomic_write_text(
            self.root / name / "result.json",
            json.dumps({"value": value, "seconds": seconds}, indent=1, default=float) + "\n",
        )
        self.log(f"[{name}] done in {seconds:.0f} s")
        return value
