import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# A continual-agent run small enough for the default suite (tiny model, a few episodes and updates).
TINY_AGENT = dict(
    model="tiny",
    episodes=16,
    update_every=8,
    eval_every=8,
    eval_n=3,
    gate_control=3,
    gate_learned=2,
    epochs=1,
    batch_size=4,
    max_new_tokens=8,
    progress=False,
)


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
