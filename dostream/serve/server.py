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
from dostream.serve.protocol import ApiError, bad, parse_feedback
from dostream.serve.store import Feedback, ServeStore


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

        start = None if cfg.adapter is None else Path(cfg.adapter)
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
        self.prepare = Preparer(
            self.store,
            self.tok,
            self.context,
            client_assistant=cfg.client_assistant,
            fast_step=cfg.fast_step,
            memory=self.memory,
        )
        self.batcher = (
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
            )
        )
        self.started = int(time.time())
        self.learner = Learner(  # updates, the gate, hot swap, rollback (serve/learn.py)
            cfg.learn,
            model=cfg.model,
            store=self.store,
            lineage=self.lineage,
            tok=self.tok,
            slot=self.slot,
            load=load,
            fast_step=cfg.fast_step,
        )
        self.metrics = ServeMetrics(self.store, self.batcher, self.learner)
        # This thread loaded the model; the batcher's sampling thread decodes. This thread's OpenMP
        # workers freed, the sampling thread's do not run oversubscribed (a decode step 43 -> 28 ms
        # at 1 row: dostream/openmp.py, benchmarks/omp_pools.py).
        release_pool()

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

    def app(self):
        from dostream.serve.routes import build_app

        return build_app(self)

    # -- feedback ---------------------------------------------------------------------------
    def feedback(self, body: Any, key: str) -> dict[str, Any]:
        fb = parse_feedback(body)
        if fb.completion_id is not None:
            found = self.store.exchange(fb.completion_id)
            if found is None:
                raise ApiError(404, f"completion_id: no completion {fb.completion_id!r} here", param="completion_id")
            seq, conv, n = found
            if fb.conversation_id is not None and fb.conversation_id != conv:
                raise bad("conversation_id", f"completion {fb.completion_id!r} belongs to another conversation")
            if fb.choice >= n:
                raise bad("choice", f"the completion has {n} choice(s), got {fb.choice}")
        else:
            conv = fb.conversation_id
            seq = self.store.latest_exchange(conv)
            if seq is None:
                raise ApiError(404, f"conversation_id: no conversation {conv!r} here", param="conversation_id")
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
        )
        self.store.add_feedback(record)
        return {
            "id": record.id,
            "object": "feedback",
            "conversation_id": conv,
            "completion_id": fb.completion_id,
            "created": int(record.created),
        }
