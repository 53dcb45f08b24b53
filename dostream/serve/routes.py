"""Every endpoint of `dostream serve`, in one router. Each route fetches the server's parts from the app's state.

    GET  /health                 liveness (no key needed)
    GET  /v1/models[/{id}]       the served model (its id is the --model NAME)
    POST /v1/chat/completions    OpenAI chat completions: tools, n, seed, stop, stream, usage, logprobs
    POST /v1/responses           OpenAI Responses: input items, function tools, previous_response_id, stream
    POST /v1/completions         OpenAI legacy completions: raw prompts, echo, logprobs (`serve/completions.py`)
    WS   /v1/realtime            a session: text in as typed, answers streamed and interruptible (`serve/sessions.py`)
    GET  /v1/memory[/{id}]       the memory's notes (admin; `--memory`, `serve/memory.py`)
    DELETE /v1/memory            forget a source: ?stream=, ?user= or ?key= (admin)
    POST /v1/memory/distill      distil the conversations recorded since the last run (admin)
    POST /v1/feedback            the world's word on a completion or a conversation, with its author
    POST /v1/learn               ask for an update now (admin; `--learn`)
    GET  /v1/adapters            the adapter versions, their gate results, the one in force
    POST /v1/adapters/rollback   put an earlier accepted version back in force (admin)
    GET  /v1/conversations[/{id}]  the caller's tenant's conversations; one as its streams (export)
    GET  /v1/tenants[/{t}]       tenants (an admin key of no tenant: all; else its own) and one's snapshot
    POST /v1/tenants/{t}         set its system context (admin), a new snapshot
    POST /v1/tenants/{t}/rollback  put an earlier snapshot back as a unit (admin; `serve/tenants.py`)
    GET  /metrics                Prometheus text format (`serve/metrics.py`)

Tenants (`serve/tenants.py`): every route acts for the caller's tenant (`Auth.caller`: the key's
own, or the `X-Tenant` header / the route's for an admin key of no tenant); the learning and
memory routes use that tenant's learner and memory. Another tenant's id is a 404 that names the
field, never the value (`protocol.not_found`).

A request goes: key check → body read under the size limit (`body_of`, the one body check) →
field checks (400 naming the field) → `serve.exchange.Preparer` (which recorded sample it
continues, its new segments, the prompt) → the batcher (sampled with its batch mates, recorded in
one transaction) → the response, only once its exchange is committed. A streaming request gets
its server-sent events as tokens are drawn (`serve/events.py`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import (  # at module level: FastAPI resolves handler annotations from here
    APIRouter,
    Request,
    WebSocket,
    WebSocketDisconnect,
)
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from dostream.serve.batcher import Job, Overloaded
from dostream.serve.completions import complete
from dostream.serve.events import FINGERPRINT, chat_events
from dostream.serve.logprobs import choice_logprobs
from dostream.serve.metrics import CONTENT_TYPE
from dostream.serve.protocol import ApiError, bad, conversation_id, not_found, parse_chat, parse_json
from dostream.serve.record import StreamedContent
from dostream.serve.responses import respond
from dostream.serve.sessions import Session, SessionError, error_event

router = APIRouter()


def server_of(request: Request):
    return request.app.state.server


async def body_of(request: Request, *, empty_ok: bool = False) -> Any:
    """The request's JSON body, read under the server's size limit (413 above it, before reading
    more than the limit); `empty_ok`: an empty body is `{}`."""
    limit = server_of(request).cfg.limits.max_body
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
    raw = b"".join(chunks)
    if empty_ok and not raw.strip():
        return {}
    return parse_json(raw)


def key_for(request: Request, scope: str) -> str:
    return server_of(request).auth.check(request.headers.get("authorization"), scope)


def caller_for(request: Request, scope: str, tenant: str | None = None):
    """The `Caller` (key id, tenant): `tenant` (a route's) or the `X-Tenant` header names it."""
    named = tenant if tenant is not None else request.headers.get("x-tenant")
    return server_of(request).auth.caller(request.headers.get("authorization"), scope, named)


def tenant_for(request: Request, scope: str, tenant: str | None = None):
    """(caller, the `serve.tenants.Tenant` it acts for)."""
    who = caller_for(request, scope, tenant)
    return who, server_of(request).tenants.get(who.tenant)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad("body", "expected a JSON object")
    return body


# -- models --------------------------------------------------------------------------------------


def _model_card(server) -> dict[str, Any]:
    return {"id": server.cfg.model, "object": "model", "created": server.started, "owned_by": "dostream"}


def _no_model(model: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/v1/models")
async def models(request: Request):
    key_for(request, "chat")
    return {"object": "list", "data": [_model_card(server_of(request))]}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request):
    key_for(request, "chat")
    server = server_of(request)
    if model != server.cfg.model:
        raise _no_model(model)
    return _model_card(server)


# -- chat and feedback ---------------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat(request: Request):
    server = server_of(request)
    who, tenant = tenant_for(request, "chat")
    req = parse_chat(await body_of(request), server.cfg.limits)
    if req.model != server.cfg.model:
        raise _no_model(req.model)
    conv = conversation_id(request.headers.get("x-conversation-id"), req)
    pending = await run_in_threadpool(tenant.prepare, req, conv, who.key)
    job = Job(pending.prompt, pending.n, pending.config, pending, grammar=pending.grammar)
    tokens: asyncio.Queue = asyncio.Queue()
    if req.stream:
        loop = asyncio.get_running_loop()
        job.on_token = lambda choice, token, *scored: loop.call_soon_threadsafe(
            tokens.put_nowait, (choice, token, *scored)
        )
    try:
        future = await run_in_threadpool(server.batcher.submit, job)  # may load an adapter: off the loop
    except Overloaded as e:
        raise ApiError(503, f"server overloaded: {e}; retry later", type="server_error") from None
    headers = {"X-Conversation-Id": pending.conversation}
    head = {"id": pending.id, "created": pending.created, "model": server.cfg.model, "system_fingerprint": FINGERPRINT}
    if req.stream:
        live = [StreamedContent(server.tok, req.stop, server.eos, tools=pending.tools) for _ in range(req.n)]
        events = chat_events(head, asyncio.wrap_future(future), tokens, live, usage=req.include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    samples, exchange = await asyncio.wrap_future(future)
    body = {
        **head,
        "object": "chat.completion",
        "choices": [
            {**c, "logprobs": choice_logprobs(server.tok, s)} for c, s in zip(exchange.request["choices"], samples)
        ],
        "usage": exchange.request["usage"],
    }
    return JSONResponse(body, headers=headers)


@router.post("/v1/completions")
async def completions(request: Request):
    server = server_of(request)
    key = key_for(request, "chat")
    body, headers = await complete(server, await body_of(request), key)
    if isinstance(body, dict):
        return JSONResponse(body, headers=headers)
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


@router.post("/v1/responses")
async def responses(request: Request):
    """OpenAI's Responses API, translated onto the chat path (`serve/responses.py`)."""
    who, tenant = tenant_for(request, "chat")
    body = await body_of(request)
    return await respond(server_of(request), who.key, body, request.headers.get("x-conversation-id"), tenant)


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket):
    """A session (`serve/sessions.py`): the key as `Authorization: Bearer KEY` or the subprotocol
    `openai-insecure-api-key.KEY` (browsers), `?model=` the served model; a refused key or model
    is an `error` event, then the socket closes (1008)."""
    server = ws.app.state.server
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    via = next((p for p in offered if p.startswith("openai-insecure-api-key.")), None)
    header = ws.headers.get("authorization") or (f"Bearer {via.split('.', 1)[1]}" if via else None)
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    try:
        key = server.auth.check(header, "chat")
        model = ws.query_params.get("model")
        if model is not None and model != server.cfg.model:
            raise _no_model(model)
    except ApiError as e:
        await ws.send_text(json.dumps({"type": "error", "event_id": "event_" + secrets.token_hex(8), **e.body()}))
        await ws.close(code=1008)
        return
    session, lock = Session(server, key), asyncio.Lock()

    async def out(event: dict) -> None:
        async with lock:
            try:
                await ws.send_text(
                    json.dumps({"event_id": "event_" + secrets.token_hex(8), **event}, ensure_ascii=False)
                )
            except (WebSocketDisconnect, RuntimeError):  # the client is gone: what was drawn is recorded all the same
                pass

    session.out = out
    await out({"type": "session.created", "session": session.info()})
    try:
        while True:
            raw = await ws.receive_text()
            event: Any = None
            try:
                if len(raw) > server.cfg.limits.max_body:
                    raise SessionError("invalid_event", f"an event is at most {server.cfg.limits.max_body} bytes")
                try:
                    event = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise SessionError("invalid_json", f"not valid JSON: {e}") from None
                if not isinstance(event, dict):
                    raise SessionError("invalid_event", "expected a JSON object")
                async for reply in session.handle(event):
                    await out(reply)
            except SessionError as e:
                await out(error_event(e, event))
    except WebSocketDisconnect:
        session.cancel()  # gone mid-answer: it ends and is recorded with what was drawn and sent


def _memory(request: Request):
    memory = tenant_for(request, "admin")[1].memory
    if memory is None:
        raise ApiError(409, "this server has no memory: start it with --memory DIR", code="no_memory")
    return memory


@router.get("/v1/memory")
async def memory_list(request: Request):
    return await run_in_threadpool(_memory(request).listing)


@router.get("/v1/memory/{note}")
async def memory_note(note: int, request: Request):
    memory = _memory(request)
    try:
        return await run_in_threadpool(memory.show, note)
    except KeyError:
        raise ApiError(404, f"note {note} is not in this memory", param="note", code="not_found") from None


@router.delete("/v1/memory")
async def memory_forget(request: Request):
    memory = _memory(request)
    given = {k: v for k, v in request.query_params.items() if k in ("stream", "user", "key")}
    if len(given) != 1:
        raise bad("stream", "give exactly one source to forget: ?stream=, ?user= or ?key=")
    return await run_in_threadpool(memory.forget, **given)


@router.post("/v1/memory/distill")
async def memory_distill(request: Request):
    memory, server = _memory(request), server_of(request)
    obj = _object(await body_of(request, empty_ok=True))
    future = memory.distill(server.store.slice(caller_for(request, "admin").tenant))
    if not obj.get("wait", False):
        return JSONResponse({"object": "memory.distill", "status": "queued"}, status_code=202)
    return await asyncio.wrap_future(future)


@router.post("/v1/feedback")
async def feedback(request: Request):
    who = caller_for(request, "feedback")
    body = await body_of(request)
    return await run_in_threadpool(server_of(request).feedback, body, who.key, who.tenant)


# -- learning: updates, versions, rollback -------------------------------------------------------


@router.post("/v1/learn")
async def learn_now(request: Request):
    _, tenant = tenant_for(request, "admin")
    obj = _object(await body_of(request, empty_ok=True))
    wait = obj.get("wait", False)
    if not isinstance(wait, bool):
        raise bad("wait", "expected true or false")
    learner = tenant.learner
    if learner.cfg is None:
        raise ApiError(409, "this server does not learn: start it with --learn", code="not_learning")
    future = learner.trigger()
    if not wait:
        return JSONResponse({"object": "learn", "status": "queued"}, status_code=202)
    return {"object": "learn", **await asyncio.wrap_future(future)}


@router.get("/v1/adapters")
async def adapters(request: Request):
    return await run_in_threadpool(tenant_for(request, "chat")[1].learner.listing)


@router.post("/v1/adapters/rollback")
async def rollback(request: Request):
    _, tenant = tenant_for(request, "admin")
    version = _integer(_object(await body_of(request, empty_ok=True)), "version")
    return await _refusing(tenant.learner.rollback, version, param="version")


def _integer(obj: dict, field: str) -> int | None:
    value = obj.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad(field, "expected an integer")
    return value


async def _refusing(fn, *args, param: str):
    """`fn(*args)` on a worker thread; its LookupError is a 404, its ValueError a 409, naming `param`."""
    try:
        return await run_in_threadpool(fn, *args)
    except LookupError as e:
        raise ApiError(404, str(e).strip("'\""), param=param) from None
    except ValueError as e:
        raise ApiError(409, str(e), param=param) from None


# -- conversations and tenants -------------------------------------------------------------------


@router.get("/v1/conversations")
async def conversations(request: Request):
    who = caller_for(request, "chat")
    ids = await run_in_threadpool(server_of(request).store.conversations, who.tenant)
    return {"object": "list", "data": [{"id": c, "object": "conversation"} for c in ids]}


@router.get("/v1/conversations/{conversation}")
async def conversation(conversation: str, request: Request):
    """One conversation as its streams (`dostream streams export`'s JSON, one per path)."""
    who = caller_for(request, "chat")
    store = server_of(request).store.slice(who.tenant)
    streams = await run_in_threadpool(store.conversation_streams, conversation)
    if not streams:
        raise not_found("conversation_id")
    return {"object": "conversation", "id": conversation, "streams": [s.to_json() for s in streams]}


@router.get("/v1/tenants")
async def tenants(request: Request):
    who, server = caller_for(request, "chat"), server_of(request)
    names = server.tenants.names() if who.any_tenant else [who.tenant]
    return {"object": "list", "data": [await run_in_threadpool(server.tenants.describe, n) for n in names]}


@router.get("/v1/tenants/{name}")
async def tenant(name: str, request: Request):
    who = caller_for(request, "chat", name)
    return await run_in_threadpool(server_of(request).tenants.describe, who.tenant)


@router.post("/v1/tenants/{name}")
async def tenant_set(name: str, request: Request):
    who = caller_for(request, "admin", name)
    obj = _object(await body_of(request))
    context = obj.get("context")
    if not isinstance(context, str):
        raise bad("context", "expected a string (the tenant's system context; '' for none)")
    server = server_of(request)
    server.tenants.get(who.tenant)
    return await run_in_threadpool(server.tenants.snapshot, who.tenant, "context set", context)


@router.post("/v1/tenants/{name}/rollback")
async def tenant_rollback(name: str, request: Request):
    who = caller_for(request, "admin", name)
    snapshot = _integer(_object(await body_of(request, empty_ok=True)), "snapshot")
    return await _refusing(server_of(request).tenants.rollback, who.tenant, snapshot, param="snapshot")


# -- metrics -------------------------------------------------------------------------------------


@router.get("/metrics")
async def scrape(request: Request):
    """A key with the `chat` scope (Prometheus sends it with `authorization: {credentials: KEY}`)."""
    key_for(request, "chat")
    return Response(await run_in_threadpool(server_of(request).metrics.text), media_type=CONTENT_TYPE)


# -- the app --------------------------------------------------------------------------------------


def build_app(server):
    """The ASGI app over `server` (a `serve.server.Server`): lifespan, OpenAI-shaped errors, the
    metrics middleware, and the router."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        server.learner.start()
        server.tenants.start()
        try:
            yield
        finally:
            server.tenants.stop()
            server.learner.stop()
            server.batcher.stop()
            if server.memory is not None:
                server.memory.close()

    app = FastAPI(title="dostream serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

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

    @app.middleware("http")
    async def observe(request: Request, call_next):
        """Counts and times every request by route template (an unknown path cannot grow the labels)."""
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            server.metrics.observe(getattr(route, "path", "unmatched"), status, time.perf_counter() - t0)

    app.include_router(router)
    return app
