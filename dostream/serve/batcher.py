"""The server's one sampling thread: concurrent requests micro-batched through `sampling.sample`.

Requests arrive as `Job`s (a prompt, n choices, the request's settings and seed). The thread takes
every job waiting (after a short gathering window when it was idle, up to `max_rows` rows), samples
them in as few `sample` calls as their settings allow, records the whole batch in one store
transaction, and only then resolves each job's future: a response never goes out before its
exchange is committed (a SIGKILL loses nothing that was acknowledged).

Independence from batch mates: choice j of a request seeded s draws from the random stream
`(s, j)` (`sample(..., row_seeds=...)`), the stream row j of `dostream sample --seed s` alone would
use; requests whose settings differ only in `max_tokens` share one call, and each row is cut to its
own budget afterwards (a row's first M draws do not depend on the call's budget, as in
`envs/rollout.py`). Equal up to float rounding, as `sampling.py` says: a left-padded row's logits
differ from its unpadded ones by ~1e-7.

The model in force is read from a `ModelSlot` once per batch: the seam for issue 22's hot swap (a
new adapter goes in between batches; a batch finishes on the model it started with).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from dostream.render import decode
from dostream.sampling import Sample, SamplingConfig, sample
from dostream.serve.store import Exchange, ServeStore


class ModelSlot:
    """The model in force and the name of its adapter. The batcher reads it once per batch;
    `swap` replaces both between batches (what a learner that hot-swaps adapters calls)."""

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


@dataclass
class Job:
    """One request to sample: `n` choices of `prompt` under `config` (its `seed` is the request's)."""

    prompt: list[int]
    n: int
    config: SamplingConfig
    # Builds the exchange to record from the samples and the adapter that drew them.
    record: Callable[[list[Sample], str | None], Exchange]
    future: Future = field(default_factory=Future)  # -> (samples, exchange) once committed

    @property
    def key(self) -> tuple:
        """Jobs with equal keys share one `sample` call (everything but seed and budget)."""
        c = self.config
        return (c.is_greedy, c.temperature, c.top_p, c.stop)


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
    ):
        self.slot, self.tok, self.store = slot, tok, store
        self.max_rows, self.gather_s, self.max_queue = max_rows, gather_s, max_queue
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0  # rows queued, not yet taken
        self._lock = threading.Lock()
        self._carry: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="dostream-batcher", daemon=True)
        self.batches = 0  # counters, for tests and the benchmark's notes
        self.rows = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=60)

    def submit(self, job: Job) -> Future:
        with self._lock:
            if self._waiting + job.n > self.max_queue:
                raise Overloaded(f"{self._waiting} rows are waiting (limit {self.max_queue})")
            self._waiting += job.n
        self._q.put(job)
        return job.future

    # -- the thread -------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        # A job that did not fit in the last batch opens the next one.
        first, self._carry = (self._carry, None) if self._carry is not None else (self._q.get(), None)
        if first is None:
            return None
        jobs, rows = [first], first.n
        deadline = time.monotonic() + self.gather_s
        while rows < self.max_rows:
            try:
                # Concurrent clients arrive a few ms apart: wait briefly for them when idle; while a
                # batch ran, the queue already holds everyone who came meanwhile.
                job = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._q.put(None)  # stop after this batch
                break
            if rows + job.n > self.max_rows:
                self._carry = job
                break
            jobs.append(job)
            rows += job.n
        with self._lock:
            self._waiting -= rows
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        model, adapter, forward = self.slot.get()
        done: list[tuple[Job, list[Sample]]] = []
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        for group in groups.values():
            try:
                done += zip(group, self._sample(model, forward, group))
            except Exception as e:  # a bug or an out-of-memory: those requests fail, the server goes on
                for job in group:
                    job.future.set_exception(e)
        if not done:
            return
        try:
            records = [job.record(samples, adapter) for job, samples in done]
            for rec in records:  # what shared the batch: for the record, and the tests of independence
                rec.request["batch"] = {"requests": len(done), "rows": sum(job.n for job, _ in done)}
            self.store.add_exchanges(records)
        except Exception as e:
            for job, _ in done:
                job.future.set_exception(e)
            return
        self.batches += 1
        self.rows += sum(job.n for job, _ in done)
        for (job, samples), rec in zip(done, records):
            job.future.set_result((samples, rec))

    def _sample(self, model, forward, group: list[Job]) -> list[list[Sample]]:
        budget = max(job.config.max_new_tokens for job in group)
        prompts, seeds = [], []
        for job in group:
            prompts += [job.prompt] * job.n
            seeds += [(job.config.seed, j) for j in range(job.n)]
        cfg = replace(group[0].config, max_new_tokens=budget, seed=0, batch_size=max(len(prompts), 1))
        out = sample(model, self.tok, prompts, cfg, row_seeds=seeds, forward=forward)
        result, at = [], 0
        for job in group:
            result.append([self._cut(s, job.config.max_new_tokens) for s in out[at : at + job.n]])
            at += job.n
        return result

    def _cut(self, s: Sample, budget: int) -> Sample:
        """A row sampled with a larger budget, cut to its own: exactly what it would have drawn."""
        if len(s.token_ids) <= budget:
            return s
        ids = s.token_ids[:budget]
        return Sample(ids, decode(self.tok, ids), "length", s.prompt_len)
