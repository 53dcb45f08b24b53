"""The server's one sampling thread: concurrent requests decoded together, continuously batched.

Requests arrive as `Job`s (a prompt, n choices, the request's settings and seed). The sampling
thread keeps one `sampling.Decode` running: before every decode step it adds the rows of every job
that arrived meanwhile (up to `max_rows` rows in all; after a short gathering window when it was
idle), and a row leaves as soon as it ends, so no request waits for the longest row of a batch it
was not in. Each row decodes with its own request's settings (temperature, top-p, stop strings,
budget). A job whose n choices have all ended goes to the commit thread, which records the jobs
ended at a step in one store transaction, and only then resolves their futures: a response never
goes out before its exchange is committed (a SIGKILL loses nothing that was acknowledged), and the
decode goes on while the store writes.

Streaming: a job's `on_token(choice, token)` is called from the sampling thread as each token is
drawn; the response's final chunk still waits for the commit.

Independence from batch mates: choice j of a request seeded s draws from the random stream
`(s, j)` (`Decode.add(seeds=...)`), the stream row j of `dostream sample --seed s` alone would use,
its t-th token with the t-th draw whenever it joined. Equal up to float rounding, as `sampling/`
says: a row's logits differ with the padding and shape of the batch it shares by ~1e-7 in fp32
(bf16 rounds coarser: `ServeConfig.precision`).

The model in force is read from a `ModelSlot`: a running decode finishes on the model it started
with; once the slot holds another model (issue 22's hot swap), new rows wait until the running ones
have ended, and the next decode starts on the new model.

Prefix cache (on unless `prefix_cache=False`, `dostream serve --no-prefix-cache`): the keys and
values of leading tokens that prompts share (the chat template's head and default system prompt,
a tools preamble, a prompt sent again) are kept in a `sampling.PrefixCache` and reused, so a
joining row prefills only the rest. One cache per value of the slot: a swap, even back to an
earlier model, starts an empty one, so no row ever reads another model's keys and values. It
changes a row's logits by float rounding only (`sampling/prefix.py`).

Many adapters in one batch (`adapters`, a `sampling.adapters.AdapterPool`). A request names the
LoRA adapter it is to be answered with in `Job.adapter`, a key unique per adapter and version
(a tenant's `tenants/NAME/adapters/update-NNNNNN/adapter`), and where to load it from in
`Job.adapter_dir` (a PEFT directory, read once, on the first request that names the key: the pool
keeps it, least recently used first out under `--max-adapters` and `--adapter-cache-mb`). None:
the model in force, as before; the slot's own adapter name: the slot's model while it holds that
adapter (else the adapter per row, as any other); `BASE`: the base model with no adapter, whatever
the slot holds (a tenant that never learned beside a default tenant whose slot holds a merged
adapter: `serve/tenants.py`). The exchange records the adapter each row used (None: the base).
Rows of named adapters decode on
the pool's base model (the slot's model when it has no adapter merged, else the base loaded once
beside it), all adapters in one decode: the base products are shared and each row adds its own
adapter's delta (`cached_forward.CachedForward.many`), so a row draws what its adapter alone
draws, up to float rounding. Their prefill and prefix-cache entries are keyed by the adapter's key
with the ids. A new version of an adapter is a new key: rows already decoding finish on the
version they started with, rows admitted after the request names the new key decode on it. Rows
of the slot's merged model and rows on the base do not share a decode: the decode in progress
takes the rows that fit it, in arrival order, until one that does not is first in line; then it
drains and the next one starts on that row's model (as a hot swap does). Models without the
sampler's own forward (not Llama-family) cannot add per-row adapters: there a named adapter is
merged into a copy of the base (`AdapterPool.target`) and decodes with the rows of that adapter
alone, one adapter per decode (correct, not mixed).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from dostream.sampling import Decode, PrefixCache, Sample, SamplingConfig
from dostream.sampling.adapters import AdapterPool
from dostream.sampling.grammar import Grammar
from dostream.serve.store import Exchange, ServeStore


class ModelSlot:
    """The model in force (in eval mode) and the name of its adapter. The batcher reads it before
    every step; `swap` replaces both, and rows admitted after it decode on the new model (a running
    decode finishes on the model it started with)."""

    def __init__(self, model, adapter: str | None = None, *, forward=None):
        self._lock = threading.Lock()
        self._value = (model, adapter, forward)

    def get(self) -> tuple[object, str | None, object]:
        """(model, adapter name, its prebuilt `CachedForward` or None)."""
        with self._lock:
            return self._value

    def swap(self, model, adapter: str | None, *, forward=None) -> None:
        with self._lock:
            self._value = (model, adapter, forward)


# `Job.adapter` naming the base model with no adapter, whatever the slot holds (recorded as None).
BASE = ""


class Recordable(Protocol):
    def exchange(self, samples: list[Sample], adapter: str | None) -> Exchange: ...


@dataclass
class Job:
    """One request to sample: `n` choices of `prompt` under `config` (its `seed` is the request's)."""

    prompt: list[int]
    n: int
    config: SamplingConfig
    # What to record: a `serve.exchange.Pending`, whose `exchange(samples, adapter)` is the record.
    pending: Recordable
    future: Future = field(default_factory=Future)  # -> (samples, exchange) once committed
    # Called from the sampling thread with (choice, token id) as each token is drawn (streaming); with
    # `config.logprobs` set, (choice, token id, (logprob, top)) (`Decode`'s hook).
    on_token: Callable[..., None] | None = None
    # The grammar every choice must follow (`response_format`, `tool_choice`, strict tools).
    grammar: Grammar | None = None
    # Set from any thread (`cancel`): its rows end at the next decode step, reason "cancelled".
    cancelled: bool = False
    # Filled by the batcher.
    samples: list[Sample | None] = field(default_factory=list)
    # The adapter to answer with: a key naming one adapter version (None: the model in force; `BASE`:
    # the base model); the batcher sets it to what the rows used (None: the base), the exchange records it.
    adapter: str | None = None
    adapter_dir: str | None = None  # the PEFT directory of `adapter`, loaded the first time the key is named
    _lora: object = None  # `sampling.adapters.Lora` of `adapter` (None: the slot's model as it is)
    _left: int = 0
    _finished_before: int = 0  # jobs finished before this one joined
    _shared: int = 0  # jobs it shared decode steps with, itself included
    _rows: int = 0  # the most rows its decode steps had


_WAKE = object()  # queued by `cancel`: the sampling thread looks again
# The server's prefix cache: the chat template's heads and shared preambles, and one growing entry
# per listening session (`warm`): with the cache's own default of 8 entries, 8 typing sessions
# evicted each other's prefills before their answers began. Bounded in tokens (SmolLM2-135M: ~46 KB
# of keys and values a token in fp32, so 16,384 tokens ~0.75 GB at most); the count of entries only
# so that it is bounded: entries are per adapter, and at 64, 8 tenants asking 8 prompts each evicted
# each other's entries as fast as they were made (each made by a forward of its own: 11% of the
# sampling thread, against 1% for one adapter over the same prompts; py-spy).
PREFIX_ENTRIES, PREFIX_TOKENS = 1024, 16384


@dataclass
class Warm:
    """Prompt ids to prefill into the prefix cache between decode steps, ahead of the request they
    will begin (a session's input while the user is still typing); its future: tokens prefilled."""

    ids: tuple[int, ...]
    future: Future = field(default_factory=Future)


class Overloaded(Exception):
    """More rows waiting than the server accepts (`max_queue`)."""


class Batcher:
    def __init__(
        self,
        slot: ModelSlot,
        tok,
        store: ServeStore,
        *,
        max_rows: int = 64,
        gather_s: float = 0.005,
        max_queue: int = 4096,
        prefix_cache: bool = True,
        adapters: AdapterPool | None = None,
    ):
        self.slot, self.tok, self.store = slot, tok, store
        self.adapters = adapters  # jobs naming an adapter of their own (None: only the model in force)
        self.max_rows, self.gather_s, self.max_queue = max_rows, gather_s, max_queue
        self.prefix_cache = prefix_cache
        self.prefixes: PrefixCache | None = None  # the cache of the decode's model (None: off)
        self._slot_cache: tuple = (None, None)  # (the slot's value, its prefix cache)
        self._base_cache: PrefixCache | None = None  # the adapter pool's base model's, where not the slot's
        self._q: queue.Queue[Job | Warm | None] = queue.Queue()
        self._warms: deque[Warm] = deque()
        self._commits: queue.Queue[list[Job] | None] = queue.Queue()
        self._waiting = 0  # rows queued, not yet decoding
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="dostream-batcher", daemon=True)
        self._committer = threading.Thread(target=self._commit_loop, name="dostream-commit", daemon=True)
        # Counters (tests, `GET /metrics`): decodes started from empty, decode steps, store
        # transactions, rows sampled; steps that prefilled joining rows, the rows each step carried
        # (summed: / steps = the mean batch) and its seconds (summed).
        self.batches = self.steps = self.commits = self.rows = 0
        self.join_steps = self.step_rows = 0
        self.step_seconds = 0.0
        self.running = 0  # rows in the decode now
        self.warmed = 0  # prompt tokens prefilled ahead of their request (`warm`)
        self.warms = 0  # prefills ahead asked for (`warm` calls)
        self.on_step: Callable[[float], None] | None = None  # called with each step's seconds

    def start(self) -> None:
        self._thread.start()
        self._committer.start()

    def stop(self) -> None:
        """Finish what was submitted, then stop."""
        self._q.put(None)
        self._thread.join(timeout=60)
        self._committer.join(timeout=60)

    @property
    def waiting(self) -> int:
        """Rows queued, not yet decoding."""
        return self._waiting

    def submit(self, job: Job) -> Future:
        """Queue `job`; an adapter it names is loaded here, on the caller's thread, if not held."""
        if job.adapter is not None and (job.adapter or None) != self.slot.get()[1]:
            if self.adapters is None:
                raise ValueError(f"adapter {job.adapter!r}: this server serves only its model in force")
            if job.adapter != BASE:
                job._lora = self.adapters.get(job.adapter, job.adapter_dir)
            self.adapters.base()  # loaded here on first use
        with self._lock:
            if self._waiting + job.n > self.max_queue:
                raise Overloaded(f"{self._waiting} rows are waiting (limit {self.max_queue})")
            self._waiting += job.n
        self._q.put(job)
        return job.future

    def warm(self, ids: list[int]) -> Future:
        """Prefill `ids` into the prefix cache of the model in force, between decode steps (each
        waits for the step that runs before it: the cost to rows decoding is the prefill's time);
        a later request whose prompt begins with them prefills only the rest."""
        w = Warm(tuple(ids))
        self.warms += 1
        self._q.put(w)
        return w.future

    def cancel(self, job: Job) -> None:
        """End `job`'s rows at the next decode step (an interrupted answer): its samples end with
        what was drawn, `finish_reason` "cancelled", and are recorded as usual."""
        job.cancelled = True
        self._q.put(_WAKE)

    # -- the sampling thread ----------------------------------------------------------------
    def _arrivals(self, waiting: deque, idle: bool) -> bool:
        """Move queued jobs to `waiting`; when idle, block for the first and gather briefly.
        Returns False once stop was asked."""
        if idle and not waiting:
            job = self._q.get()
            if job is None:
                return False
            if not isinstance(job, Job):  # a prefill ahead of time, or a wake-up
                self._warms.extend([job] if isinstance(job, Warm) else [])
                return True
            waiting.append(job)
            # Concurrent clients arrive a few ms apart: wait briefly for them so they prefill together.
            deadline = time.monotonic() + self.gather_s
            while sum(j.n for j in waiting) < self.max_rows:
                try:
                    job = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    return False
                self._take(job, waiting)
            return True
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self._take(job, waiting)

    def _take(self, item: Job | Warm, waiting: deque) -> None:
        if isinstance(item, Job):
            waiting.append(item)
        elif isinstance(item, Warm):
            self._warms.append(item)

    def _target(self, job: Job, current: tuple) -> tuple:
        """The (model, adapter name, forward) `job`'s rows decode on: the slot's value (for a job
        naming none, or naming the adapter the slot holds), else the pool's base (the slot's value
        itself where that is the base; a copy with the adapter merged for models without
        `CachedForward`)."""
        if job.adapter is None or (job.adapter or None) == current[1]:
            return current
        base = self.adapters.base()
        if current[0] is base[0] and current[2] is not None:
            return current
        if job.adapter == BASE:
            return base
        if job._lora is None:  # it named the slot's adapter, and the slot has swapped since: per row now
            job._lora = self.adapters.get(job.adapter, job.adapter_dir)
        return self.adapters.target(job._lora)

    def _first(self, waiting: deque, current: tuple) -> tuple | None:
        """The target of the first job in line (None: none waits). A job whose adapter cannot be
        loaded now (its directory gone: a forget rolled it back) fails alone; the next is first."""
        while waiting:
            try:
                return self._target(waiting[0], current)
            except Exception as e:
                job = waiting.popleft()
                with self._lock:
                    self._waiting -= job.n
                self._fail([job], e)
        return None

    def _prefix_cache(self, want: tuple, current: tuple) -> PrefixCache | None:
        """The prefix cache of the decode about to start on `want`: one per value of the slot (a
        swap, even back to an earlier model, starts an empty one), one for the pool's base."""
        if not self.prefix_cache:
            return None
        if want is current:
            if self._slot_cache[0] is not current:
                self._slot_cache = (current, PrefixCache(current[0], entries=PREFIX_ENTRIES, tokens=PREFIX_TOKENS))
            return self._slot_cache[1]
        if want[0] is not self.adapters.base()[0]:  # an adapter merged into a copy (no CachedForward)
            return None
        if self._base_cache is None:
            self._base_cache = PrefixCache(want[0], entries=PREFIX_ENTRIES, tokens=PREFIX_TOKENS)
        return self._base_cache

    def _loop(self) -> None:
        waiting: deque[Job] = deque()
        live: dict[int, Job] = {}  # id -> job with rows in the decode
        run: Decode | None = None
        value = None  # the (model, adapter name, forward) the decode runs on
        admitted = finished = 0
        stopping = False
        while True:
            idle = run is None or run.active == 0
            if not stopping:
                stopping = not self._arrivals(waiting, idle)
            if idle and not waiting and stopping:
                break
            current = self.slot.get()
            want = self._first(waiting, current) or current
            if run is None or (run.active == 0 and want is not value):
                self.prefixes = self._prefix_cache(want, current)
                value = want
                run = Decode(want[0], self.tok, forward=want[2], prefix_cache=self.prefixes)
            if self._warms:  # prefills ahead of time, all waiting in one prefill
                warms, self._warms = list(self._warms), deque()

                def settle(n: int, warms=warms) -> None:
                    self.warmed += n
                    for w in warms:
                        w.future.set_result(n)

                # riding the running rows' next step (no forward of its own), else on its own now
                if run.active and run.ahead([w.ids for w in warms], settle):
                    warms = []
                try:
                    if warms:
                        settle(self.prefixes.warm([w.ids for w in warms], run.pad, run.forward) if self.prefixes else 0)
                except Exception as e:
                    for w in warms:
                        w.future.set_exception(e)
            if any(job.cancelled for job in live.values()):
                run.cancel(lambda tag: tag[0].cancelled)
            # Admit while rows fit (a job alone is admitted whatever its size), in arrival order, while
            # the first in line decodes on this decode's model (the model in force, or the adapters' base).
            batch: list[Job] = []
            rows = run.active
            while waiting and self._first(waiting, current) is value and (run.active == 0 or run.joinable):
                job = waiting[0]
                if batch or rows:
                    if rows + job.n > self.max_rows:
                        break
                batch.append(waiting.popleft())
                rows += job.n
            if batch:
                with self._lock:
                    self._waiting -= sum(job.n for job in batch)
                if run.active == 0:
                    self.batches += 1
                try:
                    self._admit(run, batch, value[1])
                except Exception as e:  # a bug or an out-of-memory: those requests fail, the server goes on
                    self._fail([*live.values(), *batch], e)
                    live.clear()
                    run, self.running = None, 0
                    continue
                for job in batch:
                    job._finished_before = finished
                    live[id(job)] = job
                admitted += len(batch)
            if run.active == 0:
                run.flush_ahead()  # a prefill ahead left waiting for a step: on its own now
                continue
            carried, joins, t0 = run.active, bool(run.joining), time.perf_counter()
            try:
                ended = run.step()
            except Exception as e:
                self._fail(list(live.values()), e)
                live.clear()
                run, self.running = None, 0
                continue
            seconds = time.perf_counter() - t0
            self.steps += 1
            self.join_steps += joins
            self.step_rows += carried
            self.step_seconds += seconds
            self.running = run.active
            if self.on_step is not None:
                self.on_step(seconds)
            for job in live.values():
                job._rows = max(job._rows, run.active + len(ended))
            done = []
            for row in ended:
                job, j = row.tag
                job.samples[j] = row.sample(self.tok)
                job._left -= 1
                if job._left == 0:
                    done.append(live.pop(id(job)))
            if done:
                finished += len(done)
                for job in done:
                    job._shared = admitted - job._finished_before
                self._commits.put(done)
        self._commits.put(None)

    def _admit(self, run: Decode, batch: list[Job], adapter: str | None) -> None:
        """Add `batch`'s rows to `run`, a decode on a model whose own adapter is `adapter` (None: the
        base): a job naming another adapter adds it per row; each job records what its rows use."""
        prompts, seeds, configs, tags, hooks, grammars, loras = [], [], [], [], [], [], []
        for job in batch:
            job.samples, job._left = [None] * job.n, job.n
            lora = job._lora if job.adapter and job.adapter != adapter else None
            job.adapter = adapter if lora is None else job.adapter  # what its rows use, recorded
            for j in range(job.n):
                prompts.append(job.prompt)
                seeds.append((job.config.seed, j))
                configs.append(job.config)
                tags.append((job, j))
                hooks.append(_hook(job, j) if job.on_token is not None else None)
                grammars.append(job.grammar)
                loras.append(lora)
        # (on a copy with the adapter merged, where the model has no CachedForward: none per row)
        adapters = loras if run.forward is not None and any(a is not None for a in loras) else None
        run.add(prompts, seeds, configs, tags, hooks=hooks, grammars=grammars, adapters=adapters)

    @staticmethod
    def _fail(jobs: list[Job], e: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(e)

    # -- the commit thread ------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            jobs = self._commits.get()
            if jobs is None:
                return
            while True:  # everything ended meanwhile goes in the same transaction
                try:
                    more = self._commits.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._commits.put(None)
                    break
                jobs += more
            try:
                records = [job.pending.exchange(job.samples, job.adapter) for job in jobs]
                for job, rec in zip(jobs, records):  # what it shared its decode with: the record, the tests
                    rec.request["batch"] = {"requests": job._shared, "rows": job._rows}
                self.store.add_exchanges(records)
            except Exception as e:
                self._fail(jobs, e)
                continue
            self.commits += 1
            self.rows += sum(job.n for job in jobs)
            for job, rec in zip(jobs, records):
                job.future.set_result((job.samples, rec))


def _hook(job: Job, choice: int) -> Callable[..., None]:
    def hook(token: int, *scored) -> None:
        if job.on_token is None:
            return
        try:
            job.on_token(choice, token, *scored)
        except Exception:  # a streaming consumer's failure never stops the decode (the exchange is still recorded)
            job.on_token = None

    return hook
