"""`dostream serve`: the OpenAI-compatible endpoint (FastAPI + uvicorn) that records every exchange.

    GET  /v1/models              the served model (its id is the --model NAME)
    POST /v1/chat/completions    OpenAI chat completions: tools, n, seed, stop, stream, usage
    POST /v1/feedback            the world's word on a completion or a conversation, with its author
    GET  /health                 liveness (no key needed)

A request goes: key check → body read under the size limit → field checks (400 naming the field)
→ `Server.prepare` (which recorded sample it continues, its new segments, the prompt rendered from
the recorded stream: `Renderer(tok, chat_template=True).prompt_ids(stream)`, so the ids the model
conditions on are the ids a training run renders) → the batcher (sampled with its batch mates,
recorded in one transaction) → the response, only once its exchange is committed.

A streaming request (`stream: true`) gets its server-sent events as the tokens are drawn: a role
chunk per choice, then content deltas (`record.StreamedContent`: text that is settled, never a stop
string, an end-of-turn token or a tool call's text), and once the exchange is committed, the rest
of each choice's content, its tool calls, its finish reason, a usage chunk and `[DONE]`. What a
client may rely on: a chunk with a `finish_reason` (and `[DONE]`) is sent only after the exchange
is committed, so it is recorded exactly as streamed; content chunks alone are what the model was
drawing, and a stream cut before the finish reason (a dropped connection, a killed server) may or
may not have been recorded. A failure after the stream began is an `error` event, without `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves handler annotations from the module's names

from dostream.openmp import release_pool
from dostream.render import Renderer, RenderError
from dostream.sampling import SamplingConfig, agent_segment, default_eos
from dostream.serve.auth import Auth
from dostream.serve.batcher import Batcher, Job, ModelSlot, Overloaded
from dostream.serve.learn import Learner, adapter_in_force
from dostream.serve.learn import install as install_learn
from dostream.serve.metrics import ServeMetrics
from dostream.serve.metrics import install as install_metrics
from dostream.serve.protocol import (
    ApiError,
    ChatRequest,
    Limits,
    bad,
    conversation_id,
    parse_chat,
    parse_feedback,
    parse_json,
)
from dostream.serve.record import (
    FieldError,
    StreamedContent,
    call_prefixes,
    canonical,
    continuation_key,
    lookup_keys,
    new_segments,
    prefix_states,
    reply,
)
from dostream.serve.store import Exchange, Feedback, ServeStore
from dostream.stream import AUTHORS, Stream

FINGERPRINT = "dostream-serve"


@dataclass
class ServeConfig:
    model: str = "smollm2"
    adapter: str | None = None
    store: str = "runs/serve"
    host: str = "127.0.0.1"
    port: int = 8000
    client_assistant: str = "teacher"  # author of a client's assistant message that matches no sample
    dtype: str = "fp32"
    max_batch_rows: int = 64
    gather_ms: float = 5.0
    max_queue: int = 4096
    fast_step: bool = True
    prefix_cache: bool = True  # reuse the keys and values of prompts' shared leading tokens (--no-prefix-cache)
    limits: Limits = field(default_factory=Limits)
    learn: Any = None  # a `serve.learn.LearnConfig`: learn while serving (--learn)

    def __post_init__(self) -> None:
        if self.client_assistant not in AUTHORS or self.client_assistant == "agent":
            raise ValueError(
                f"--client-assistant: expected an author other than agent (the server records agent turns "
                f"only as it samples them), got {self.client_assistant!r}"
            )
        if self.dtype not in ("fp32", "bf16", "auto"):
            raise ValueError(f"--dtype: expected fp32, bf16 or auto, got {self.dtype!r}")


@dataclass
class Prepared:
    id: str
    conversation: str
    created: int
    prompt: list[int]
    job: Job
    tools: bool  # tools in force: tool-call blocks are not content


class Server:
    """The model, the store, the batcher and the key check; `app()` is the ASGI app over them."""

    def __init__(self, cfg: ServeConfig, *, env_key: str | None = None, model=None, tok=None):
        import torch

        from dostream.cached_forward import CachedForward
        from dostream.models import load_model, load_tokenizer

        self.cfg = cfg
        self.store = ServeStore.open_dir(cfg.store)
        self.auth = Auth(self.store, env_key)
        self.tok = tok if tok is not None else load_tokenizer(cfg.model)
        from dostream.train import device_policy

        # auto: bf16 where a bf16 matmul measures faster here (train.bf16_faster), else fp32; a
        # forced bf16 warns where it is emulated. `self.dtype`: what the model runs in.
        bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device_policy("auto").bf16)
        if cfg.dtype == "bf16":
            device_policy("on")  # the warning where bf16 is emulated
        self.dtype = "bf16" if bf16 else "fp32"
        dtype = torch.bfloat16 if bf16 else torch.float32
        # The adapter in force: the last accepted update's (serve/learn.py), else --adapter.
        adapter, adapter_name = adapter_in_force(self.store, cfg.adapter)
        if model is None:
            # Merged: a served adapter does not change between batches (a hot swap replaces the model).
            model = load_model(cfg.model, dtype=dtype, adapter=adapter, merge=adapter is not None)
        with torch.inference_mode():
            forward = CachedForward.build(model) if cfg.fast_step else None
        self.slot = ModelSlot(model, adapter_name, forward=forward)
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.renderer = Renderer(self.tok, chat_template=True)
        self.eos = default_eos(model, self.tok)  # what ends a turn: never streamed as content
        self._special = [t for t in self.tok.all_special_tokens if t]
        self.batcher = Batcher(
            self.slot,
            self.tok,
            self.store,
            max_rows=cfg.max_batch_rows,
            gather_s=cfg.gather_ms / 1000,
            max_queue=cfg.max_queue,
            prefix_cache=cfg.prefix_cache,
        )
        self.started = int(time.time())
        self.learner = Learner(self, cfg.learn)  # updates, the gate, hot swap, rollback (serve/learn.py)
        self.metrics = ServeMetrics(self)
        # This thread loaded the model; the batcher's sampling thread decodes. This thread's OpenMP
        # workers freed, the sampling thread's do not run oversubscribed (a decode step 43 -> 28 ms
        # at 1 row: dostream/openmp.py, benchmarks/omp_pools.py).
        release_pool()

    # -- a chat request → a job -------------------------------------------------------------
    def prepare(self, req: ChatRequest, conversation: str | None, key: str) -> Prepared:
        tools = req.tools_in_force
        self._no_special_tokens(req)
        states = prefix_states(tools, req.messages)
        match = self.store.find_continuation(lookup_keys(req.messages, states), conversation)
        try:
            if match is not None:
                at, seq, choice, found = match
                path = self.store.path_segments(seq, choice)
                new = new_segments(req.messages[at + 1 :], at + 1, None, self.cfg.client_assistant)
                parent: tuple[int, int] | None = (seq, choice)
                conversation = conversation or found
            else:
                path, parent = [], None
                new = new_segments(req.messages, 0, tools, self.cfg.client_assistant)
                conversation = conversation or "conv-" + secrets.token_hex(8)
        except FieldError as e:
            raise bad(e.field, e.reason) from None
        try:
            prompt = self.renderer.prompt_ids(Stream(conversation, path + new))
        except RenderError as e:
            raise bad("messages", str(e)) from None
        if len(prompt) + req.max_tokens > self.context:
            raise bad(
                "max_tokens",
                f"the conversation is {len(prompt)} tokens; with max_tokens {req.max_tokens} it exceeds "
                f"the model's context of {self.context}",
            )
        cid = "chatcmpl-" + secrets.token_hex(12)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        config = SamplingConfig(
            temperature=req.temperature,
            top_p=req.top_p,
            max_new_tokens=req.max_tokens,
            stop=req.stop,
            seed=seed,
            greedy=req.temperature == 0,
            fast_step=self.cfg.fast_step,
        )
        settings = {
            "model": req.model,
            "n": req.n,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_tokens": req.max_tokens,
            "stop": list(req.stop),
            "seed": seed,
            "tool_choice": req.tool_choice,
            "stream": req.stream,
            "user": req.user,
            "metadata": req.metadata,
        }

        prefixes = call_prefixes(self.tok, tools, req.tool_choice)

        def record(samples, adapter) -> Exchange:
            choices, keys, segments = [], [], []
            for c, s in enumerate(samples):
                message, finish = reply(
                    s,
                    self.tok,
                    req.stop,
                    tools=tools is not None,
                    call_prefix=f"call_{cid[9:17]}{c}_",
                    forced=prefixes is not None,
                )
                choices.append({"index": c, "message": message, "finish_reason": finish})
                keys.append(continuation_key(states, message))
                meta: dict[str, Any] = {"finish_reason": s.finish_reason}
                if s.constrained:  # provenance: these leading ids were drawn under tool_choice's constraint
                    meta["constrained"] = s.constrained
                if "tool_calls" in message:
                    meta["tool_calls"] = message["tool_calls"]
                segments.append(agent_segment(s, role="assistant", meta=meta))
            usage = {
                "prompt_tokens": len(prompt),
                "completion_tokens": sum(len(s.token_ids) for s in samples),
            }
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return Exchange(
                id=cid,
                conversation=conversation,
                parent=None if parent is None else parent[0],
                parent_choice=None if parent is None else parent[1],
                segments=new,
                samples=segments,
                request={**settings, "choices": choices, "usage": usage},
                adapter=adapter,
                api_key=key,
                continuations=keys,
            )

        job = Job(prompt, req.n, config, record, prefixes=prefixes)
        return Prepared(cid, conversation, int(time.time()), prompt, job, tools is not None)

    def _no_special_tokens(self, req: ChatRequest) -> None:
        """A template's special tokens in a client's text would be read as the template's own
        markers (a user forging the end of its turn): refused, naming the message."""
        for i, m in enumerate(req.messages):
            text = canonical(m)
            hit = next((t for t in self._special if t in text), None)
            if hit is not None:
                raise bad(f"messages[{i}].content", f"contains the tokenizer's special token {hit!r}")
        if req.tools:
            text = json.dumps(req.tools, ensure_ascii=False)
            hit = next((t for t in self._special if t in text), None)
            if hit is not None:
                raise bad("tools", f"contains the tokenizer's special token {hit!r}")

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

    # -- the ASGI app -----------------------------------------------------------------------
    def app(self):
        from contextlib import asynccontextmanager

        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException

        server = self
        name = self.cfg.model

        @asynccontextmanager
        async def lifespan(app):
            server.batcher.start()
            server.learner.start()
            try:
                yield
            finally:
                server.learner.stop()
                server.batcher.stop()

        app = FastAPI(title="dostream serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(request, e: ApiError):
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(HTTPException)
        async def http_error(request, e: HTTPException):
            body = ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).body()
            return JSONResponse(body, status_code=e.status_code)

        @app.exception_handler(Exception)
        async def server_error(request, e: Exception):
            body = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
            return JSONResponse(body, status_code=500)

        async def body_of(request: Request) -> bytes:
            limit = server.cfg.limits.max_body
            declared = request.headers.get("content-length")
            too_big = ApiError(
                413, f"body: larger than this server's limit of {limit} bytes", param="body", code="request_too_large"
            )
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise too_big
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
            return b"".join(chunks)

        def model_card() -> dict[str, Any]:
            return {"id": name, "object": "model", "created": server.started, "owned_by": "dostream"}

        def no_model(model: str) -> ApiError:
            return ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models(request: Request):
            server.auth.check(request.headers.get("authorization"), "chat")
            return {"object": "list", "data": [model_card()]}

        @app.get("/v1/models/{model:path}")
        async def model(model: str, request: Request):
            server.auth.check(request.headers.get("authorization"), "chat")
            if model != name:
                raise no_model(model)
            return model_card()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            key = server.auth.check(request.headers.get("authorization"), "chat")
            req = parse_chat(parse_json(await body_of(request)), server.cfg.limits)
            if req.model != name:
                raise no_model(req.model)
            conv = conversation_id(request.headers.get("x-conversation-id"), req)
            prepared = await run_in_threadpool(server.prepare, req, conv, key)
            tokens: asyncio.Queue = asyncio.Queue()
            if req.stream:
                loop = asyncio.get_running_loop()
                prepared.job.on_token = lambda choice, token: loop.call_soon_threadsafe(
                    tokens.put_nowait, (choice, token)
                )
            try:
                future = server.batcher.submit(prepared.job)
            except Overloaded as e:
                raise ApiError(503, f"server overloaded: {e}; retry later", type="server_error") from None
            headers = {"X-Conversation-Id": prepared.conversation}
            head = {"id": prepared.id, "created": prepared.created, "model": name, "system_fingerprint": FINGERPRINT}
            if req.stream:
                live = [StreamedContent(server.tok, req.stop, server.eos, tools=prepared.tools) for _ in range(req.n)]
                events = _events(head, asyncio.wrap_future(future), tokens, live)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            _, exchange = await asyncio.wrap_future(future)
            body = {
                **head,
                "object": "chat.completion",
                "choices": [{**c, "logprobs": None} for c in exchange.request["choices"]],
                "usage": exchange.request["usage"],
            }
            return JSONResponse(body, headers=headers)

        @app.post("/v1/feedback")
        async def feedback(request: Request):
            key = server.auth.check(request.headers.get("authorization"), "feedback")
            body = parse_json(await body_of(request))
            return await run_in_threadpool(server.feedback, body, key)

        install_learn(app, server)  # /v1/learn, /v1/adapters, /v1/adapters/rollback
        install_metrics(app, server)  # /metrics and the middleware that times every request
        return app


async def _events(head: dict, done: asyncio.Future, tokens: asyncio.Queue, live: list[StreamedContent]):
    """The OpenAI chunk stream of a completion as it is drawn: a role chunk per choice, content
    deltas as tokens arrive; once the exchange is committed (`done`), per choice the rest of its
    content, its tool calls and its finish reason; a usage chunk; `[DONE]`."""

    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        body = {
            **head,
            "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(item: tuple[int, int]) -> str | None:
        choice, token = item
        text = live[choice].push(token)
        return chunk(choice, {"content": text}) if text else None

    for c in range(len(live)):
        yield chunk(c, {"role": "assistant", "content": ""})
    while not done.done():
        get = asyncio.ensure_future(tokens.get())
        await asyncio.wait({get, done}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            break
        if (out := delta(get.result())) is not None:
            yield out
    while not tokens.empty():  # drawn before the commit, queued behind it
        if (out := delta(tokens.get_nowait())) is not None:
            yield out
    try:
        _, exchange = done.result()
    except Exception as e:  # the request failed after the stream began: an error event, no [DONE]
        body = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
        yield f"data: {json.dumps(body)}\n\n"
        return
    for c in exchange.request["choices"]:
        message, index = c["message"], c["index"]
        if rest := live[index].rest(message):
            yield chunk(index, {"content": rest})
        for k, call in enumerate(message.get("tool_calls") or []):
            yield chunk(index, {"tool_calls": [{"index": k, **call}]})
        yield chunk(index, {}, c["finish_reason"])
    last = {**head, "object": "chat.completion.chunk", "choices": [], "usage": exchange.request["usage"]}
    yield f"data: {json.dumps(last)}\n\n"
    yield "data: [DONE]\n\n"


def serve(cfg: ServeConfig, *, env_key: str | None, log_level: str = "info") -> None:
    """Load the model, open the store and serve until interrupted."""
    import uvicorn

    server = Server(cfg, env_key=env_key)
    if not server.auth.configured():
        server.store.close()
        raise ValueError(
            "no API key: set DOSTREAM_API_KEY, or make one with `dostream serve keys add --store "
            f"{cfg.store}`; dostream serve never runs unguarded"
        )
    uvicorn.run(server.app(), host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=30)
