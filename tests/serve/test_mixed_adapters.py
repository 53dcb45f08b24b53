"""The batcher with many adapters in one batch: jobs naming adapters (`Job.adapter`, `Job.adapter_dir`)
decode together on the base model, each choice drawing what its adapter alone draws (fp32, seeded),
rows joining mid-decode; a new version of one adapter mid-decode; the pool's LRU limits."""

from __future__ import annotations

import copy
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from harness import decisive_model, random_lora

from dostream.cached_forward import CachedForward
from dostream.sampling import SamplingConfig, sample
from dostream.sampling.adapters import AdapterPool, Lora
from dostream.serve.batcher import Batcher, Job, ModelSlot


class _Store:
    def add_exchanges(self, records) -> None:
        pass


class _Pending:
    def exchange(self, samples, adapter):
        return SimpleNamespace(request={}, adapter=adapter)


@pytest.fixture(scope="module")
def tenants(tok, tmp_path_factory):
    """A base model and three tenants' PEFT adapters of it, saved (what the pool loads) and kept
    as `PeftModel`s (the reference: each adapter alone)."""
    base = decisive_model(tok)
    root = tmp_path_factory.mktemp("adapters")
    peft, dirs = {}, {}
    for i in range(3):
        peft[f"t{i}"], dirs[f"t{i}"] = random_lora(base, 20 + i, root / f"t{i}"), root / f"t{i}"
    return SimpleNamespace(base=base, peft=peft, dirs=dirs)


def _batcher(base, tok, **pool):
    with torch.inference_mode():
        slot = ModelSlot(base, None, forward=CachedForward.build(base))
    return Batcher(slot, tok, _Store(), gather_s=0.05, adapters=AdapterPool(base=slot.get(), **pool))


def _job(prompt, seed, adapter=None, adapter_dir=None, n=2, on_token=None, greedy=False):
    # fp32 named: `auto` picks bf16 on a CPU with AVX512-BF16, and the references would round apart
    cfg = SamplingConfig(temperature=0.9, max_new_tokens=8, seed=seed, precision="fp32", greedy=greedy)
    return Job(prompt, n, cfg, _Pending(), adapter=adapter, adapter_dir=adapter_dir, on_token=on_token)


def _alone(model, tok, job):
    return [
        sample(model, tok, [job.prompt], job.config, row_seeds=[(job.config.seed, j)])[0].token_ids
        for j in range(job.n)
    ]


def test_jobs_of_many_adapters_decode_together_each_as_alone(tenants, tok):
    """Jobs of three adapters and the model in force, some joining the running decode: each
    choice's ids are its adapter's alone; they shared decode steps; each records its key."""
    batcher = _batcher(tenants.base, tok)
    batcher.start()
    prompts = [tok(t)["input_ids"] for t in ("What is 2+2?", "Name a colour.", "Hi there, how")]
    names = ["t0", "t1", None, "t2", "t0", None, "t1"]
    jobs = [
        _job(
            prompts[k % 3],
            5 + k,
            None if a is None else f"{a}@v1",
            None if a is None else tenants.dirs[a],
            n=1 + (k < 3),
        )
        for k, a in enumerate(names)
    ]
    try:
        futures = [batcher.submit(j) for j in jobs[:4]]
        deadline = time.monotonic() + 60
        while batcher.steps < 2 and time.monotonic() < deadline:  # the rest join a running decode
            time.sleep(0.005)
        futures += [batcher.submit(j) for j in jobs[4:]]
        for f in futures:
            f.result(timeout=60)
    finally:
        batcher.stop()
    assert batcher.batches == 1 and max(j._rows for j in jobs) >= 7  # one decode, rows of every adapter
    for job, a in zip(jobs, names):
        assert job.adapter == (None if a is None else f"{a}@v1")
        got = [s.token_ids for s in job.samples]
        assert got == _alone(tenants.base if a is None else tenants.peft[a], tok, job), (a, job.prompt)


def test_a_new_version_mid_decode_and_the_pools_limits(tenants, tok):
    """t0's version 2 named while its version 1 decodes: the running job finishes on version 1, the
    new one decodes on version 2. The pool holds 2 adapters: the least recently used goes and loads
    again when named. Greedy: what is checked is which version each row decodes on; a seeded draw
    can sit within float rounding of a bin's edge (seen: a uniform 4e-8 from it), where the grouped
    products and PEFT's alone may pick neighbours (the test above checks seeded draws)."""
    batcher = _batcher(tenants.base, tok, max_adapters=2)
    started = threading.Event()
    prompt = tok("What is 2+2?")["input_ids"]
    old = _job(prompt, 3, "t0@v1", tenants.dirs["t0"], on_token=lambda *a: started.set(), greedy=True)
    new = _job(prompt, 3, "t0@v2", tenants.dirs["t2"], greedy=True)  # version 2: other weights
    batcher.start()
    try:
        first = batcher.submit(old)
        started.wait(30)
        second = batcher.submit(new)
        first.result(timeout=60), second.result(timeout=60)
        assert old._rows >= 4  # they shared steps
        assert batcher.adapters.held() == ["t0@v1", "t0@v2"]
        third = _job(prompt, 4, "t1@v1", tenants.dirs["t1"], n=1, greedy=True)
        batcher.submit(third).result(timeout=60)
        assert batcher.adapters.held() == ["t0@v2", "t1@v1"] and batcher.adapters.evictions == 1
        again = _job(prompt, 4, "t0@v1", tenants.dirs["t0"], n=1, greedy=True)
        batcher.submit(again).result(timeout=60)
        assert batcher.adapters.loads == 4
    finally:
        batcher.stop()
    assert [s.token_ids for s in old.samples] == _alone(tenants.peft["t0"], tok, old)
    assert [s.token_ids for s in new.samples] == _alone(tenants.peft["t2"], tok, new)
    assert [s.token_ids for s in again.samples] == _alone(tenants.peft["t0"], tok, again)


def test_a_model_without_the_samplers_forward_decodes_one_adapter_at_a_time(tok):
    """Mistral with sliding windows (no `CachedForward`): a job's adapter is merged into a copy of
    the base and decodes with its own adapter's rows only; each job's ids are its adapter's alone."""
    from conftest import seeded, small_config
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    base = seeded(lambda: MistralForCausalLM(small_config(MistralConfig, tok, sliding_window=6)))
    assert CachedForward.build(base) is None
    peft = {}
    for i in range(2):
        with torch.random.fork_rng():
            torch.manual_seed(30 + i)
            peft[i] = get_peft_model(
                copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
            ).eval()
    pool = AdapterPool(base=(base, None, None))
    batcher = Batcher(ModelSlot(base, None), tok, _Store(), gather_s=0.05, adapters=pool)
    prompt = tok("What is 2+2?")["input_ids"]
    jobs = [_job(prompt, 9, None, n=1), *(_job(prompt, 9, f"m{i}@v1", n=1) for i in range(2))]
    for i in range(2):
        pool.get(f"m{i}@v1", lambda i=i: Lora.from_peft(f"m{i}@v1", peft[i]))
    batcher.start()
    try:
        for f in [batcher.submit(j) for j in jobs]:
            f.result(timeout=60)
    finally:
        batcher.stop()
    assert batcher.batches == 3  # one adapter per decode
    for job, model in zip(jobs, [base, peft[0], peft[1]]):
        assert [s.token_ids for s in job.samples] == _alone(model, tok, job)
