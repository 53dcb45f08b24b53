"""The engine interface the server samples through (`Engine`), and vLLM behind it (`VllmEngine`).

Cut at the batcher: the rest of the server (routes, sessions, the learner's hot swap, metrics) talks
to `server.batcher`, an `Engine`: `submit(job)` a `Job` (prompt ids, n, its `SamplingConfig` with
the request's seed, an `on_token(choice, token)` hook for streaming), `cancel(job)`, `warm(ids)`,
`start()`/`stop()`, and a few counters. The adapter is the `ModelSlot`'s in force when the job is
submitted; the record is `job.pending.exchange(samples, adapter)`, committed before the future
resolves. `serve.batcher.Batcher` (dostream's own engine, the CPU default) is one;
`VllmEngine` (`dostream serve --engine vllm`) is the other.

`VllmEngine`: vLLM's `AsyncLLM` in this process (`sampling.vllm_backend.VllmRunner`), the base
model loaded once from a directory; the adapter in force goes with each request as a `LoRARequest`
under a fresh name and id per value of the slot (a hot swap or a rollback, even back to an earlier
adapter, gets a new one: vLLM's prefix cache never serves another version's blocks). A choice j of
a request seeded s is one vLLM request seeded `_row_seed(s, j)`. The recorded agent segment holds
vLLM's own sampled ids; `logprobs` are vLLM's raw log-probs (its default `raw_logprobs`, the
meaning dostream's engine gives them). Not supported (400): grammars (`response_format`,
`tool_choice`, strict tools): vLLM's own structured outputs are not wired to dostream's `Grammar`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol, runtime_checkable

from dostream.sampling import default_eos
from dostream.sampling.vllm_backend import VllmRunner, engine_args, lora, model_dir, params, to_sample
from dostream.serve.batcher import Job, ModelSlot, Overloaded
from dostream.serve.protocol import ApiError
from dostream.serve.store import ServeStore

ENGINES = ("dostream", "vllm")


@runtime_checkable
class Engine(Protocol):
    """What the server samples through (`Server.batcher`)."""

    on_step: Callable[[float], None] | None

    @property
    def waiting(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, job: Job) -> Future: ...

    def cancel(self, job: Job) -> None: ...

    def warm(self, ids: list[int]) -> Future: ...


class VllmEngine:
    """vLLM's async engine behind `Engine`. `resolve(adapter name) -> directory` finds the slot's
    adapter (the server's `Lineage.path_of`); `extra`: `--engine-arg`s for vLLM's engine args."""

    def __init__(
        self,
        slot: ModelSlot,
        tok,
        store: ServeStore,
        *,
        model: str,
        resolve: Callable[[str | None], Path | None],
        dtype: str = "float32",
        lora_rank: int = 0,
        max_queue: int = 4096,
        extra: dict | None = None,
    ):
        self.slot, self.tok, self.store, self.resolve, self.max_queue = slot, tok, store, resolve, max_queue
        weights, tokenizer = model_dir(model)
        self.runner = VllmRunner(engine_args(weights, tokenizer, dtype=dtype, lora_rank=lora_rank, **(extra or {})))
        self.eos = default_eos(slot.get()[0], tok)
        self._lora: tuple[object, object] | None = None  # (slot value, its LoRARequest)
        self._lock = threading.Lock()
        self._tasks: dict[int, list[asyncio.Task]] = {}  # id(job) -> its rows' tasks
        self._finishing: set[asyncio.Future] = set()  # a job's wait for its rows, then its commit
        self._commits: queue.Queue = queue.Queue()
        self._committer = threading.Thread(target=self._commit_loop, name="dostream-vllm-commit", daemon=True)
        self._waiting = 0
        # The counters `serve/metrics.py` reads (steps are vLLM's: not counted here).
        self.batches = self.steps = self.commits = self.rows = 0
        self.join_steps = self.step_rows = self.running = self.warmed = 0
        self.step_seconds = 0.0
        self.on_step: Callable[[float], None] | None = None

    @property
    def waiting(self) -> int:
        return self._waiting

    def start(self) -> None:
        self._committer.start()

    def stop(self) -> None:
        """Finish what was submitted, then stop (the engine's processes end)."""
        pending = list(self._finishing)
        if pending:
            self.runner.submit(asyncio.wait(pending, timeout=60)).result(timeout=90)
        self._commits.put(None)
        if self._committer.is_alive():
            self._committer.join(timeout=60)
        self.runner.shutdown()

    def warm(self, ids: list[int]) -> Future:
        """A no-op: vLLM's prefix cache fills as requests run."""
        f: Future = Future()
        f.set_result(0)
        return f

    def _adapter(self):
        """(name recorded, `LoRARequest` or None) for the slot's value now: a fresh one per value."""
        value = self.slot.get()
        name = value[1]
        if name is None:
            return None, None
        with self._lock:
            if self._lora is None or self._lora[0] is not value:
                self._lora = (value, lora(self.resolve(name), Path(name).name))
            return name, self._lora[1]

    def submit(self, job: Job) -> Future:
        if job.grammar is not None:
            raise ApiError(400, "--engine vllm: response_format, tool_choice and strict tools are not supported yet")
        with self._lock:
            if self._waiting + job.n > self.max_queue:
                raise Overloaded(f"{self._waiting} rows are waiting (limit {self.max_queue})")
            self._waiting += job.n
        job.adapter, request = self._adapter()
        self.runner.loop.call_soon_threadsafe(self._start, job, request)
        return job.future

    def cancel(self, job: Job) -> None:
        """End `job`'s rows now: its samples end with what was drawn, `finish_reason` "cancelled"."""
        job.cancelled = True

        def cancel_tasks():
            for t in self._tasks.get(id(job), []):
                t.cancel()

        self.runner.loop.call_soon_threadsafe(cancel_tasks)

    # -- on the runner's event loop ---------------------------------------------------------
    def _start(self, job: Job, request) -> None:
        with self._lock:
            self._waiting -= job.n
        self.batches += 1
        self.running += job.n
        drawn: list[list[int]] = [[] for _ in range(job.n)]
        scored = [[] if job.config.logprobs is not None else None for _ in range(job.n)]
        tasks = [
            asyncio.ensure_future(self._row(job, j, request, drawn[j], scored[j]), loop=self.runner.loop)
            for j in range(job.n)
        ]
        self._tasks[id(job)] = tasks
        if job.cancelled:
            for t in tasks:
                t.cancel()

        async def finish():
            await asyncio.wait(tasks)
            self._tasks.pop(id(job), None)
            self.running -= job.n
            errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
            if errors:
                job.future.set_exception(errors[0])
                return
            job.samples = [
                to_sample(self.tok, ids, len(job.prompt), job.config, self.eos, cancelled=t.cancelled(), scored=sc)
                for ids, t, sc in zip(drawn, tasks, scored)
            ]
            self._commits.put(job)

        done = asyncio.ensure_future(finish(), loop=self.runner.loop)
        self._finishing.add(done)
        done.add_done_callback(self._finishing.discard)

    async def _row(self, job: Job, j: int, request, drawn: list[int], scored: list | None) -> None:
        def hook(token: int, *entry) -> None:
            drawn.append(token)
            if scored is not None:
                scored.append(entry[0])
            if job.on_token is not None:
                try:
                    job.on_token(j, token, *entry)
                except Exception:  # a streaming consumer's failure never stops the row (still recorded)
                    job.on_token = None

        sp = params(job.config, (job.config.seed, j), self.eos, stream=True)
        await self.runner.stream(job.prompt, sp, request, on_token=hook)

    # -- the commit thread ------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            job = self._commits.get()
            if job is None:
                return
            try:
                rec = job.pending.exchange(job.samples, job.adapter)
                rec.request["engine"] = "vllm"
                self.store.add_exchanges([rec])
            except Exception as e:
                job.future.set_exception(e)
                continue
            self.commits += 1
            self.rows += job.n
            job.future.set_result((job.samples, rec))
