"""`POST /v1/responses`, OpenAI's Responses API, as a translation onto the chat path. Knows no model.

A request's `instructions` and `input` items become OpenAI chat messages (`instructions` a system
message first; a `function_call` item an assistant message's `tool_calls`, merged into the
assistant message before it; a `function_call_output` a `tool` message), its flat function tools
chat tools, and the rest is the chat path's: `serve.exchange.Preparer` finds the recorded sample
it continues (a client that resends the whole history continues it by its continuation keys), the
batcher samples, the commit thread records. `previous_response_id` names the parent outright: the
new items follow that response's recorded choice (`Preparer(parent=...)`), in its conversation.
The response id (`resp_...`) is the exchange's id, so feedback and `previous_response_id` find it.

`store: false` is recorded all the same (dostream records every exchange) and echoed as sent;
a later `previous_response_id` pointing to it works as for any other.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from dostream.serve.batcher import Job, Overloaded
from dostream.serve.protocol import (
    _RESERVED,
    ApiError,
    ChatRequest,
    Limits,
    _int,
    _number,
    bad,
    conversation_id,
    not_found,
    response_format,
)
from dostream.serve.record import StreamedContent
from dostream.serve.responses_events import finished, response_events

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
# Fields OpenAI defines whose behaviour dostream cannot give: refused when set, never ignored.
_REFUSED = {
    "reasoning": "reasoning settings are not supported by dostream serve",
    "include": "extra outputs are not supported by dostream serve",
    "background": "background responses are not supported by dostream serve",
    "prompt": "stored prompts are not supported by dostream serve",
    "conversation": "the Conversations API is not supported by dostream serve (use previous_response_id)",
    "max_tool_calls": "not supported by dostream serve",
    "top_logprobs": "not supported by dostream serve",
}


def _str(obj: dict, key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise bad(f"{where}.{key}", "missing field" if v is None else "expected a string")
    return v


def _content(content: Any, where: str) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, "expected a string or a list of content parts")
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise bad(f"{where}[{k}].type", f"unsupported content part {kind!r}: dostream streams hold text")
        parts.append({"type": "text", "text": _str(part, "text", f"{where}[{k}]")})
    return parts


def input_messages(items: Any, instructions: str | None) -> tuple[list[dict], list[str]]:
    """`instructions` and `input` → chat messages, and for each message the request field it came
    from (`instructions`, `input[3]`): a 400 on a message names the field the client wrote."""
    messages: list[dict] = []
    where: list[str] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
        where.append("instructions")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
        messages.append(items[0])
        return messages, [*where, "input"]
    if not isinstance(items, list) or not items:
        raise bad("input", "expected a string or a non-empty list of items")
    for i, item in enumerate(items):
        w = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(w, f"expected an object, got {type(item).__name__}")
        for k in _RESERVED:
            if k in item:
                raise bad(f"{w}.{k}", "not accepted from a client: the server records who wrote what")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad(f"{w}.role", f"expected one of {', '.join(_ROLES)}, got {role!r}")
            messages.append({"role": role, "content": _content(item.get("content"), f"{w}.content")})
        elif kind == "function_call":
            call = {
                "id": _str(item, "call_id", w),
                "type": "function",
                "function": {"name": _str(item, "name", w), "arguments": _str(item, "arguments", w)},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and where[-1] != "instructions":
                last.setdefault("tool_calls", []).append(call)  # one assistant turn: its text, then its calls
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            content = _content(out, f"{w}.output") if out is not None else None
            if content is None:
                raise bad(f"{w}.output", "missing field")
            messages.append({"role": "tool", "tool_call_id": _str(item, "call_id", w), "content": content})
        elif kind == "reasoning":
            continue  # a reply's reasoning: the recorded sample holds it (the canonical form ignores it)
        else:
            raise bad(f"{w}.type", f"unsupported input item {kind!r}")
        where.append(w)
    if not messages:
        raise bad("input", "no message in the input")
    return messages, where


def chat_tools(tools: Any) -> list[dict] | None:
    """Responses function tools (flat) → chat tools (under `function`); built-in tools refused."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools", "expected a list of tools")
    out = []
    for i, t in enumerate(tools):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise bad(f"tools[{i}].type", f"only function tools are supported by dostream serve, got {kind!r}")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"tools[{i}].name", "missing field")
        fn: dict[str, Any] = {"name": name}
        if t.get("description") is not None:
            fn["description"] = _str(t, "description", f"tools[{i}]")
        if t.get("parameters") is not None:
            if not isinstance(t["parameters"], dict):
                raise bad(f"tools[{i}].parameters", "expected a JSON Schema object")
            fn["parameters"] = t["parameters"]
        if t.get("strict") is not None and not isinstance(t["strict"], bool):
            raise bad(f"tools[{i}].strict", "expected a boolean")
        out.append({"type": "function", "function": fn})
    return out or None


def _tool_choice(tc: Any, tools: list[dict] | None) -> Any:
    """Responses `tool_choice` → chat's."""
    if tc is None:
        return "auto" if tools else "none"
    if tc in ("none", "auto", "required"):
        if tc == "required" and not tools:
            raise bad("tool_choice", "'required' needs tools")
        return tc
    if isinstance(tc, dict) and tc.get("type") == "function":
        name = tc.get("name")
        if name not in {t["function"]["name"] for t in tools or []}:
            raise bad("tool_choice.name", f"{name!r} is not in tools")
        return {"type": "function", "function": {"name": name}}
    raise bad("tool_choice", f"expected 'none', 'auto', 'required' or a function, got {tc!r}")


def parse_responses(obj: Any, limits: Limits) -> tuple[ChatRequest, list[str], dict[str, Any]]:
    """A Responses request → the chat request it is, each message's request field, and the
    request's own settings (echoed in the response and recorded with the exchange)."""
    if not isinstance(obj, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(obj).__name__}", param="body")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "missing field" if model is None else "expected a string")
    for key, why in _REFUSED.items():
        if obj.get(key) not in (None, False, [], {}, 0) and not (key == "reasoning" and _empty(obj[key])):
            raise bad(key, why)
    if obj.get("truncation") not in (None, "disabled"):
        raise bad("truncation", "only 'disabled' is supported by dostream serve")
    fmt = (obj.get("text") or {}).get("format") if isinstance(obj.get("text"), dict) else None
    if obj.get("text") is not None and not isinstance(obj["text"], dict):
        raise bad("text", "expected an object")
    rf = response_format(fmt, "text.format", nested=False)
    instructions = obj.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions", "expected a string")
    if "input" not in obj:
        raise bad("input", "missing field")
    messages, where = input_messages(obj["input"], instructions)
    tools = chat_tools(obj.get("tools"))
    max_tokens = obj.get("max_output_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise bad("max_output_tokens", f"expected a positive integer, got {max_tokens!r}")
        if max_tokens > limits.max_tokens:
            raise bad("max_output_tokens", f"at most {limits.max_tokens} on this server, got {max_tokens}")
    own: dict[str, Any] = {}
    for key, kind, default in (
        ("stream", bool, False),
        ("store", bool, True),
        ("parallel_tool_calls", bool, True),
        ("previous_response_id", str, None),
        ("user", str, None),
    ):
        v = obj.get(key)
        if v is not None and not isinstance(v, kind):
            raise bad(key, f"expected a {'boolean' if kind is bool else 'string'}")
        own[key] = default if v is None else v
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("metadata", "expected an object of strings")
    req = ChatRequest(
        model=model,
        messages=messages,
        tools=tools,
        tool_choice=_tool_choice(obj.get("tool_choice"), tools),
        temperature=_number(obj, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(obj, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        max_tokens=max_tokens or limits.default_max_tokens,
        seed=_int(obj, "seed", -(2**63), 2**63 - 1),  # dostream's own (extra_body), as in chat
        stream=own["stream"],
        user=own["user"],
        metadata=dict(metadata),
        response_format=rf,
        parallel_tool_calls=own["parallel_tool_calls"],
        # a Responses function tool is strict unless it says `strict: false` (OpenAI's default)
        strict_tools=tuple(t["name"] for t in obj.get("tools") or [] if t.get("strict", True) is not False),
        tool_param="tools[{}].parameters",
    )
    own.update(
        instructions=instructions,
        max_output_tokens=max_tokens,
        tools=[{"strict": None, **t} for t in obj.get("tools") or []],
        tool_choice=obj.get("tool_choice") or "auto",
        metadata=dict(metadata),
        format=fmt if rf is not None else {"type": "text"},
    )
    return req, where, own


def _empty(reasoning: Any) -> bool:
    return isinstance(reasoning, dict) and all(v is None for v in reasoning.values())


_FIELD = re.compile(r"^messages\[(\d+)\]")


def _renamed(e: ApiError, where: list[str], offset: int) -> ApiError:
    """A chat-path 400 renamed to the Responses field (`messages[2].content` → `input[1].content`)."""
    if e.param is None:
        return e

    def rename(param: str) -> str:
        m = _FIELD.match(param)
        if m is not None:
            i = int(m.group(1)) - offset
            return (where[i] if 0 <= i < len(where) else "input") + param[m.end() :]
        return {"messages": "input", "max_tokens": "max_output_tokens"}.get(param, param)

    new = rename(e.param)
    message = new + e.message[len(e.param) :] if e.message.startswith(e.param) else e.message
    return ApiError(e.status, message, type=e.type, param=new, code=e.code)


def _parent(
    server, req: ChatRequest, own: dict, where: list[str], tenant: str
) -> tuple[tuple[int, int] | None, str | None, int]:
    """The recorded choice `previous_response_id` names (one of `tenant`'s: another tenant's is
    the same 404 as an id that does not exist, naming the field, never the value), its
    conversation, and how many leading messages were dropped as already recorded (the same
    `instructions` sent again)."""
    rid = own["previous_response_id"]
    if rid is None:
        return None, None, 0
    found = server.store.exchange(rid, tenant)
    if found is None:
        raise not_found("previous_response_id")
    seq, conv, _ = found
    path = server.store.path_segments(seq, 0)
    recorded = next((s.meta["tools"] for s in path if "tools" in s.meta), [])
    from dostream.importers.base import checked_tools

    if checked_tools(req.tools or [], "tools") != recorded:
        raise bad(
            "tools", f"differ from the tools of the conversation {rid!r} continues (one tool list a conversation)"
        )
    dropped = 0
    if own["instructions"] is not None and any(
        s.author == "context" and s.text == own["instructions"] for s in path
    ):  # the same instructions every turn (what the Agents SDK sends): recorded once
        req.messages.pop(0)
        where.pop(0)
        dropped = 1
    if not req.messages:
        raise bad("input", "no message in the input")
    return (seq, 0), conv, dropped


async def respond(server, key: str, body: Any, header_conversation: str | None, tenant):
    """The handler of `POST /v1/responses` (registered in `serve/routes.py`), for `key` acting
    for `tenant` (a `serve.tenants.Tenant`)."""
    req, where, own = parse_responses(body, server.cfg.limits)
    if req.model != server.cfg.model:
        raise ApiError(404, f"The model '{req.model}' does not exist", param="model", code="model_not_found")
    named = conversation_id(header_conversation, req)
    parent, conv, _ = await run_in_threadpool(_parent, server, req, own, where, tenant.name)
    if parent is not None and named is not None and named != conv:
        raise bad("previous_response_id", f"belongs to conversation {conv!r}, not {named!r}")
    try:
        pending = await run_in_threadpool(tenant.prepare, req, conv or named, key, parent=parent)
    except ApiError as e:
        raise _renamed(e, where, 0) from None
    pending.id = "resp_" + secrets.token_hex(24)
    pending.settings.update(api="responses", **{k: v for k, v in own.items() if k != "metadata"})
    job = Job(pending.prompt, pending.n, pending.config, pending, grammar=pending.grammar)
    tokens: asyncio.Queue = asyncio.Queue()
    if req.stream:
        loop = asyncio.get_running_loop()
        job.on_token = lambda choice, token: loop.call_soon_threadsafe(tokens.put_nowait, (choice, token))
    try:
        future = await run_in_threadpool(server.batcher.submit, job)  # may load an adapter: off the loop
    except Overloaded as e:
        raise ApiError(503, f"server overloaded: {e}; retry later", type="server_error") from None
    head = response_head(server, pending, req, own)
    headers = {"X-Conversation-Id": pending.conversation}
    if req.stream:
        live = StreamedContent(server.tok, req.stop, server.eos, tools=pending.tools)
        events = response_events(head, asyncio.wrap_future(future), tokens, live)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    _, exchange = await asyncio.wrap_future(future)
    return JSONResponse(finished(head, exchange), headers=headers)


def response_head(server, pending, req: ChatRequest, own: dict) -> dict[str, Any]:
    """The response object before its output: what every event and the final body share."""
    return {
        "id": pending.id,
        "object": "response",
        "created_at": pending.created,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": own["instructions"],
        "max_output_tokens": own["max_output_tokens"],
        "model": server.cfg.model,
        "output": [],
        "parallel_tool_calls": own["parallel_tool_calls"],
        "previous_response_id": own["previous_response_id"],
        "reasoning": {"effort": None, "summary": None},
        "store": own["store"],
        "temperature": req.temperature,
        "text": {"format": own["format"]},
        "tool_choice": own["tool_choice"],
        "tools": own["tools"],
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": own["user"],
        "metadata": own["metadata"],
    }
