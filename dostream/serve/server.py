"""The server's state, built once: precision, store, keys, model, batcher, learner, metrics. Knows no route.

`Server` is the composition root (vLLM's `init_app_state`): it resolves the precision once, opens
the store, loads the tokenizer and the model with the adapter in force, and hands every part only
what it uses. The routes (`serve/routes.py`) fetch their handlers from it; `serve/routes.py` builds
the ASGI app over it.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from dostream.device import resolve_precision, torch_dtype
from dostream.learning.cycle import Lineage
from dostream.openmp import release_pool
from dostream.sampling import default_eos
from dostream.serve.auth import Auth
from dostream.serve.batcher import Batcher, ModelSlot
from dostream.serve.config import ServeConfig
from dostream.serve.exchange import Preparer
from dostream.serve.learn import Learner, serving_adapter
from dostream.serve.memory import ServedMemory
from dostream.serve.metrics import ServeMetrics
from dostream.serve.protocol import bad, not_found, parse_feedback
from dostream.serve.store import DEFAULT_TENANT, Feedback, ServeStore
from dostream.serve.tenants import Engines, Tenant, Tenants, context_of, reconcile


class Server:
    """The parts of one server. `app()` is the ASGI app over them (`serve/routes.py`)."""

    def __init__(self, cfg: ServeConfig, *, env_key: str | None = None, model=None, tok=None):
        import torch

        from dostream.cached_forward import CachedForward
        from dostream.models import load_model, load_tokenizer

        self.cfg = cfg
        self.store = ServeStore.open_dir(cfg.store)
        self.auth = Auth(self.store, env_key)
        self.tok = tok if tok is not None else load_tokenizer(cfg.model)
        # Resolved once (`device.resolve_precision`): what the model runs in, here and in the learner.
        self.dtype = resolve_precision(cfg.precision, "cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch_dtype(self.dtype)

        def load(adapter: Path | None):
            """The base model with `adapter` merged (a served adapter does not change between
            batches: a hot swap replaces the model), in the resolved precision."""
            return load_model(cfg.model, dtype=dtype, adapter=adapter, merge=adapter is not None)

        self.load = load

        start = None if cfg.adapter is None else Path(cfg.adapter)
        self._finish_forgets(start)  # a `dostream forget` killed part way completes before anything is served
        self.lineage = Lineage(Path(cfg.store), self.store.versions, start=start)
        adapter, adapter_name = serving_adapter(self.lineage)  # the last accepted update's, else --adapter
        if model is None:
            model = load(adapter)
        with torch.inference_mode():
            forward = CachedForward.build(model) if cfg.fast_step else None
        self.slot = ModelSlot(model, adapter_name, forward=forward)
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos = default_eos(model, self.tok)  # what ends a turn: never streamed as content
        # --memory: notes retrieved into prompts (`serve/memory.py`); None without
        self.memory = None if cfg.memory is None else ServedMemory(cfg.memory, cfg.memory_k, self.slot, self.tok)
        # Tenants (`serve/tenants.py`): the default one is this server's own parts, over its slice.
        self.tenants = Tenants(self)
        own = self.store.slice(DEFAULT_TENANT)
        preparer = Preparer(
            own,
            self.tok,
            self.context,
            client_assistant=cfg.client_assistant,
            fast_step=cfg.fast_step,
            memory=self.memory,
            system=lambda: context_of(self.store, DEFAULT_TENANT),
        )
        self.engine = (
            self._engine(cfg)
            if cfg.engine == "vllm"
            else Batcher(
                self.slot,
                self.tok,
                self.store,
                max_rows=cfg.max_batch_rows,
                gather_s=cfg.gather_ms / 1000,
                max_queue=cfg.max_queue,
                prefix_cache=cfg.prefix_cache,
                adapters=self._adapters(cfg, dtype, load),
            )
        )
        self.batcher = Engines(self.engine, self.tenants)  # each job to its tenant's engine
        self.started = int(time.time())
        self.learner = Learner(  # updates, the gate, hot swap, rollback (serve/learn.py)
            cfg.learn,
            model=cfg.model,
            store=own,
            lineage=self.lineage,
            tok=self.tok,
            slot=self.slot,
            load=load,
            fast_step=cfg.fast_step,
        )
        mdir = None if cfg.memory is None else Path(cfg.memory)
        self.tenants.default(Tenant(DEFAULT_TENANT, self.lineage, self.slot, self.learner, preparer, self.memory, mdir))
        reconcile(self.store, DEFAULT_TENANT, self.lineage, mdir)
        self.metrics = ServeMetrics(self.store, self.batcher, self.learner)
        # This thread loaded the model; the batcher's sampling thread decodes. This thread's OpenMP
        # workers freed, the sampling thread's do not run oversubscribed (a decode step 43 -> 28 ms
        # at 1 row: dostream/openmp.py, benchmarks/omp_pools.py).
        release_pool()

    def _adapters(self, cfg: ServeConfig, dtype, load):
        """The pool of adapters requests name (`Job.adapter`: many adapters in one batch), over the
        slot's model where it has none merged, else over the base model loaded on first use."""
        from dostream.sampling.adapters import AdapterPool

        def base():
            import torch

            from dostream.cached_forward import CachedForward

            plain = load(None)
            with torch.inference_mode():
                return plain, None, CachedForward.build(plain) if cfg.fast_step else None

        return AdapterPool(
            max_adapters=cfg.max_adapters,
            max_bytes=cfg.adapter_cache_mb * 2**20,
            dtype=dtype,
            base=self.slot.get() if self.slot.get()[1] is None else base,
        )

    def _engine(self, cfg: ServeConfig):
        """`--engine vllm`: the base model loaded once in vLLM, the slot's adapter as a per-request
        LoRA (`serve/engine.py`); LoRA is enabled where an adapter may be served (--adapter, --learn)."""
        from dostream.sampling.vllm_backend import parse_engine_args
        from dostream.serve.engine import VllmEngine

        extra = parse_engine_args(cfg.engine_arg)
        rank = int(extra.pop("max_lora_rank", 64 if cfg.adapter is not None or cfg.learn is not None else 0))
        return VllmEngine(
            self.slot,
            self.tok,
            self.store,
            model=cfg.model,
            resolve=self.lineage.path_of,
            dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.dtype],
            lora_rank=rank,
            max_queue=cfg.max_queue,
            extra=extra,
        )

    def _finish_forgets(self, start: Path | None) -> None:
        from dostream.serve import forget
        from dostream.serve.learn import LearnConfig

        def make_learner(piece, lineage):
            cfg = self.cfg
            return Learner(
                cfg.learn or LearnConfig(), model=cfg.model, store=piece, lineage=lineage, tok=self.tok,
                slot=ModelSlot(None), load=self.load, fast_step=False,
            )  # fmt: skip

        for fid in forget.pending(self.cfg.store):
            forget.run(self.cfg.store, fid, memory=self.cfg.memory, start_adapter=start, make_learner=make_learner)

    def prepare(self, req, conversation: str | None, key: str, **kw):
        """`serve.exchange.Preparer` of the key's tenant (its slice, memory, system context)."""
        return self.tenants.get(self.tenants.of_key(key)).prepare(req, conversation, key, **kw)

    def app(self):
        from dostream.serve.routes import build_app

        return build_app(self)

    # -- feedback ---------------------------------------------------------------------------
    def feedback(self, body: Any, key: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """Record feedback on one of `tenant`'s completions or conversations (another's: 404)."""
        fb = parse_feedback(body)
        if fb.completion_id is not None:
            found = self.store.exchange(fb.completion_id, tenant)
            if found is None:
                raise not_found("completion_id")
            seq, conv, n = found
            if fb.conversation_id is not None and self.store.slice(tenant).qualify(fb.conversation_id) != conv:
                raise bad("conversation_id", f"completion {fb.completion_id!r} belongs to another conversation")
            if fb.choice >= n:
                raise bad("choice", f"the completion has {n} choice(s), got {fb.choice}")
        else:
            conv = fb.conversation_id
            conv = self.store.slice(tenant).qualify(conv)
            seq = self.store.latest_exchange(conv, tenant)
            if seq is None:
                raise not_found("conversation_id")
        meta = dict(fb.meta)
        if fb.name is not None:
            meta["name"] = fb.name
        record = Feedback(
            id="fb-" + secrets.token_hex(12),
            conversation=conv,
            exchange=seq,
            choice=fb.choice,
            author=fb.author,
            kind=fb.kind,
            text=fb.text,
            role=fb.role,
            reward=fb.reward,
            meta=meta,
            api_key=key,
            created=time.time(),
            tenant=tenant,
        )
        self.store.add_feedback(record)
        return {
            "id": record.id,
            "object": "feedback",
            "conversation_id": conv,
            "completion_id": fb.completion_id,
            "created": int(record.created),
        }
