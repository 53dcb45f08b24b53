"""The optional vLLM backend, for a model on a CUDA GPU: knows nothing of `Decode` or its caches."""

from __future__ import annotations

import copy

import torch

from dostream.device import resolve_precision
from dostream.render import decode
from dostream.sampling.config import FinishReason, Sample, SamplingConfig, default_eos
from dostream.sampling.pick import _row_seed


def _use_vllm(model, config: SamplingConfig) -> bool:
    """vLLM only for a model on a CUDA GPU with vllm importable (CPU models, tests: torch)."""
    if config.backend == "torch":
        return False
    available = torch.cuda.is_available() and next(model.parameters()).is_cuda and _vllm_installed()
    if config.backend == "vllm" and not available:
        raise RuntimeError("backend='vllm' needs the model on a CUDA GPU and the vllm package")
    return available


def _vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # not installed, or installed without a usable GPU build
        return False
    return True


def _sample_vllm(
    model, tokenizer, prompts: list[list[int]], config: SamplingConfig, seeds: list[tuple[int, int]]
) -> list[Sample]:
    """UNTESTED (no GPU where this was written). vLLM serves a model from a directory, so the
    current weights (a PEFT adapter merged into a copy) are exported to a temporary directory on
    every call: simple and always on-policy, but it pays a model load per call. Ids come from vLLM
    (its own random streams, seeded per row); text and finish reasons are recomputed here by the
    same rules as the torch path. `config.logprobs` is not passed to vLLM yet: its samples have
    `logprobs` and `top_logprobs` None (the torch path computes them)."""
    import gc
    import tempfile

    from vllm import LLM, SamplingParams, TokensPrompt

    export = copy.deepcopy(model)
    if hasattr(export, "merge_and_unload"):
        export = export.merge_and_unload()
    eos = set(config.eos_token_ids) if config.eos_token_ids is not None else default_eos(model, tokenizer)
    precision = resolve_precision(config.precision, "cuda")  # vLLM runs on a CUDA GPU only
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    params = [
        SamplingParams(
            temperature=0.0 if config.is_greedy else config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_new_tokens,
            stop=list(config.stop),
            stop_token_ids=sorted(eos),
            ignore_eos=config.eos_token_ids is not None,  # then stop_token_ids alone decide
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            seed=_row_seed(*seeds[i]),
        )
        for i in range(len(prompts))
    ]
    with tempfile.TemporaryDirectory(prefix="dostream-vllm-") as tmp:
        export.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del export
        # A modest share of GPU memory: the model being trained lives on the same GPU.
        llm = LLM(model=tmp, dtype=dtype, seed=config.seed, enable_prefix_caching=True, gpu_memory_utilization=0.4)
        try:
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        finally:
            del llm
            gc.collect()
            torch.cuda.empty_cache()
    samples = []
    for p, o in zip(prompts, outs):
        toks = list(o.outputs[0].token_ids)
        text = decode(tokenizer, toks)
        reason: FinishReason = (
            "eos" if toks and toks[-1] in eos else "stop" if any(s in text for s in config.stop) else "length"
        )
        samples.append(Sample(toks, text, reason, len(p)))
    return samples
