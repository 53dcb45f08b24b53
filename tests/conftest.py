import os
import sys
from pathlib import Path

import pytest

# The server tests' harness (tests/serve/harness.py) is a plugin: its session-scoped `served`
# server is one for every server test module.
sys.path.insert(0, str(Path(__file__).resolve().parent / "serve"))
pytest_plugins = ["harness"]

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


def small_config(cls, tok, **extra):
    """A 2-layer config of class `cls` (Llama, Qwen2, Mistral, ...) with SmolLM2's vocabulary,
    untied and with larger weights than the project's tiny model: greedy outputs vary and argmax
    margins are wide, so parity checks are not vacuous."""
    return cls(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def seeded(build):
    """`build()` under torch seed 0, in eval mode, the global random state left as it was."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build().eval()


def scored_after(model, prompt: list[int], ids: list[int]) -> list[float]:
    """The reference for sampled log-probs: `scoring.logprobs_at` of `ids` after `prompt`, one forward."""
    import torch

    from dostream.scoring import logprobs_at

    full = torch.tensor([prompt + ids])
    score = torch.zeros_like(full, dtype=torch.bool)
    score[0, len(prompt) :] = True
    with torch.inference_mode():
        return logprobs_at(model, full, torch.ones_like(full), score).tolist()
