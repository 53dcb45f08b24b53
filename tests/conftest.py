import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def tok():
    from dostream.models import load_tokenizer

    return load_tokenizer("smollm2")


def run_cli(*args, input=None, check=True, timeout=300):
    """Run `dostream ARGS...` as a subprocess, the way a user does."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "dostream.cli", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1"},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dostream {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc
