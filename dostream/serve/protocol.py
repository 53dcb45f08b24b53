"""The OpenAI wire format: request checks that name the bad field, and OpenAI-style error bodies.

Every check raises `ApiError`, which the app turns into `{"error": {"message", "type", "param",
"code"}}` with its HTTP status: 400 for a bad field (`param` names it, the message starts with it),
401 for a missing or wrong key, 403 for a key without the scope, 404 for another model, 413 for a
body over the limit. Fields OpenAI defines and dostream cannot honour (non-zero penalties,
`logit_bias`) are refused, never silently ignored; unknown fields are ignored, as OpenAI's own
server does. `response_format` `json_object` or `json_schema` constrains the reply to JSON by
grammar (`sampling/grammar.py`; `_response_format`). `logprobs: true` (with `top_logprobs` 0 to 20)
returns each sampled token's log-prob under the model's raw distribution (`serve/logprobs.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dostream.serve.config import Limits  # noqa: F401  (imported from here too)
from dostream.stream import AUTHORS


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    """400 naming the field: the message starts with it, and `param` holds it."""
    return ApiError(400, f"{param}: {message}", param=param)


def not_found(param: str) -> ApiError:
    """404 naming the field, not its value: what another tenant's id (or no such id) gets, so a
    refusal never says whose it is or echoes it."""
    return ApiError(404, f"{param}: not found for this key", param=param, code="not_found")


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: Any = "auto"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # `stream_options.include_usage`: a last chunk with the usage
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token (0 to 20), with `logprobs` only
    user: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Structured outputs: {"type": "json_object" | "json_schema", "schema": dict | None, "name",
    # "strict", "param": the field a bad schema is named by}; None: free text.
    response_format: dict | None = None
    parallel_tool_calls: bool = True  # False: at most one call a turn
    strict_tools: tuple[str, ...] = ()  # functions whose arguments follow their schema even under `auto`
    tool_param: str = "tools[{}].function.parameters"  # names a function's schema in a 400

    @property
    def tools_in_force(self) -> list[dict] | None:
        """The tools the model is shown: none under `tool_choice: "none"` (as vLLM does)."""
        return None if self.tool_choice == "none" or not self.tools else self.tools


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ApiError(400, f"body: not valid JSON{where}: {e}", param="body") from None


def _number(obj: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(key, f"expected a number, got {type(v).__name__}")
    if not (lo < v if lo_open else lo <= v) or v > hi:
        raise bad(key, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _int(obj: dict, key: str, lo: int, hi: int | None) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(key, f"expected an integer, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise bad(key, f"must be between {lo} and {hi}, got {v}" if hi is not None else f"must be >= {lo}, got {v}")
    return v


# Fields a client may not set on a message: provenance is the server's to record.
_RESERVED = ("author", "weight", "token_ids", "meta")
_MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


def _messages(obj: dict) -> list[dict]:
    msgs = obj.get("messages")
    if msgs is None:
        raise bad("messages", "missing field")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "expected a non-empty list of messages")
    for i, m in enumerate(msgs):
        w = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(w, f"expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in _MESSAGE_ROLES:
            raise bad(f"{w}.role", f"expected one of {', '.join(_MESSAGE_ROLES)}, got {role!r}")
        for k in _RESERVED:
            if k in m:
                raise bad(f"{w}.{k}", "not accepted from a client: the server records who wrote what")
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise bad(f"{w}.content", "missing field")
        if content is not None and not isinstance(content, (str, list)):
            raise bad(f"{w}.content", f"expected a string or a list of parts, got {type(content).__name__}")
        if isinstance(content, list):
            for k, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "input_text", "output_text"):
                    raise bad(
                        f"{w}.content[{k}].type", f"unsupported content part {kind!r}: dostream streams hold text"
                    )
                if not isinstance(part.get("text"), str):
                    raise bad(f"{w}.content[{k}].text", "expected a string")
        if "tool_calls" in m and m["tool_calls"] is not None:
            if role != "assistant":
                raise bad(f"{w}.tool_calls", "only assistant messages carry tool calls")
            if not isinstance(m["tool_calls"], list):
                raise bad(f"{w}.tool_calls", "expected a list")
            for k, call in enumerate(m["tool_calls"]):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise bad(f"{w}.tool_calls[{k}].function.name", "missing field")
                if not isinstance(fn.get("arguments", ""), str):
                    raise bad(f"{w}.tool_calls[{k}].function.arguments", "expected a JSON string")
        for k in ("name", "tool_call_id"):
            if k in m and not isinstance(m[k], str):
                raise bad(f"{w}.{k}", "expected a string")
    return msgs


def _tools(obj: dict) -> list[dict] | None:
    tools = obj.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools", "expected a list of tools")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad(f"tools[{i}].type", "expected 'function'")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise bad(f"tools[{i}].function", "missing field")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}].function.name", "missing field")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", "expected a JSON Schema object")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise bad(f"tools[{i}].function.strict", "expected a boolean")
    return tools or None


def _tool_choice(obj: dict, tools: list[dict] | None) -> Any:
    tc = obj.get("tool_choice")
    if tc is None:
        return "auto" if tools else "none"
    if tc in ("none", "auto", "required"):
        if tc == "required" and not tools:
            raise bad("tool_choice", "'required' needs tools")
        return tc
    if isinstance(tc, dict):
        name = (tc.get("function") or {}).get("name") if isinstance(tc.get("function"), dict) else None
        if not isinstance(name, str):
            raise bad("tool_choice.function.name", "missing field")
        if name not in {t["function"]["name"] for t in tools or []}:
            raise bad("tool_choice.function.name", f"{name!r} is not in tools")
        return tc
    raise bad("tool_choice", f"expected 'none', 'auto', 'required' or a function, got {tc!r}")


def _stop(obj: dict, limits: Limits) -> tuple[str, ...]:
    stop = obj.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "expected a non-empty string or a list of non-empty strings")
    if len(stops) > limits.max_stop:
        raise bad("stop", f"at most {limits.max_stop} stop strings, got {len(stops)}")
    return tuple(stops)


def stream_options(obj: dict, stream: bool) -> bool:
    """`stream_options.include_usage` (chat and completions), as OpenAI checks it: only with
    `stream: true`."""
    so = obj.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise bad("stream_options", "expected an object")
    if not stream:
        raise bad("stream_options", "only allowed with stream: true")
    usage = so.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad("stream_options.include_usage", "expected a boolean")
    return usage


def _logprobs(obj: dict) -> tuple[bool, int | None]:
    """`logprobs` (a boolean) and `top_logprobs` (0 to 20, only with `logprobs: true`), as OpenAI checks them."""
    asked = obj.get("logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise bad("logprobs", f"expected a boolean, got {type(asked).__name__}")
    top = _int(obj, "top_logprobs", 0, 20)
    if top is not None and not asked:
        raise bad("top_logprobs", "needs logprobs: true")
    return bool(asked), top


def _refused(obj: dict) -> None:
    for k in ("presence_penalty", "frequency_penalty"):
        if obj.get(k) not in (None, 0, 0.0):
            raise bad(k, "not supported by dostream serve (only 0)")
    if obj.get("logit_bias"):
        raise bad("logit_bias", "not supported by dostream serve")


def response_format(rf: Any, field: str, nested: bool) -> dict | None:
    """Chat's `response_format` (`nested`: the schema under `json_schema`) or the Responses
    API's `text.format` (flat) → `ChatRequest.response_format`; `field` names the object."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise bad(field, "expected an object")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": kind, "schema": None, "name": None, "strict": None, "param": field}
    if kind != "json_schema":
        raise bad(f"{field}.type", f"expected 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec, at = (rf.get("json_schema"), f"{field}.json_schema") if nested else (rf, field)
    if not isinstance(spec, dict):
        raise bad(at, "missing field" if spec is None else "expected an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise bad(f"{at}.name", "missing field" if name is None else "expected a non-empty string")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise bad(f"{at}.schema", f"expected a JSON schema object, got {type(schema).__name__}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad(f"{at}.strict", "expected a boolean")
    # strict or not, the reply is constrained to the schema (as vLLM does)
    return {"type": kind, "schema": schema, "name": name, "strict": strict, "param": f"{at}.schema"}


def parse_chat(obj: Any, limits: Limits) -> ChatRequest:
    if not isinstance(obj, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(obj).__name__}", param="body")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "missing field" if model is None else "expected a string")
    messages = _messages(obj)
    tools = _tools(obj)
    _refused(obj)
    n = _int(obj, "n", 1, limits.max_n) or 1
    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens"):
        v = obj.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, f"expected a positive integer, got {v!r}")
            if v > limits.max_tokens:
                raise bad(key, f"at most {limits.max_tokens} on this server, got {v}")
            max_tokens = v
            break
    seed = _int(obj, "seed", -(2**63), 2**63 - 1)
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "expected a boolean")
    include_usage = stream_options(obj, stream)
    user = obj.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "expected a string")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("metadata", "expected an object of strings")
    logprobs, top_logprobs = _logprobs(obj)
    parallel = obj.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("parallel_tool_calls", "expected a boolean")
    return ChatRequest(
        parallel_tool_calls=parallel,
        strict_tools=tuple(t["function"]["name"] for t in tools or [] if t["function"].get("strict")),
        model=model,
        messages=messages,
        tools=tools,
        tool_choice=_tool_choice(obj, tools),
        temperature=_number(obj, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(obj, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        max_tokens=max_tokens or limits.default_max_tokens,
        stop=_stop(obj, limits),
        n=n,
        seed=seed,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        user=user,
        metadata=dict(metadata),
        response_format=response_format(obj.get("response_format"), "response_format", nested=True),
    )


def conversation_id(header: str | None, req: ChatRequest) -> str | None:
    """The conversation a request names: the `X-Conversation-Id` header, else `metadata.conversation_id`,
    else `user`; None: found by matching the messages against recorded ones."""
    for where, value in (
        ("X-Conversation-Id", header),
        ("metadata.conversation_id", req.metadata.get("conversation_id")),
        ("user", req.user),
    ):
        if value is None:
            continue
        if not 1 <= len(value) <= 200 or not value.isprintable() or "#" in value:
            raise bad(where, "a conversation id is 1 to 200 printable characters, without '#'")
        return value
    return None


# Authors the world's feedback may have: everything but the agent (its tokens are only ever sampled).
FEEDBACK_AUTHORS = tuple(a for a in AUTHORS if a != "agent")


@dataclass
class FeedbackRequest:
    author: str
    completion_id: str | None = None
    conversation_id: str | None = None
    choice: int = 0
    kind: str = "comment"
    text: str = ""
    role: str | None = None
    reward: float | None = None
    name: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def parse_feedback(obj: Any) -> FeedbackRequest:
    if not isinstance(obj, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(obj).__name__}", param="body")
    author = obj.get("author")
    if author not in FEEDBACK_AUTHORS:
        raise bad("author", f"expected one of {', '.join(FEEDBACK_AUTHORS)}, got {author!r}")
    out = FeedbackRequest(author=author)
    for key in ("completion_id", "conversation_id", "kind", "text", "role", "name"):
        v = obj.get(key)
        if v is not None and not isinstance(v, str):
            raise bad(key, "expected a string")
        if v is not None:
            setattr(out, key, v)
    if out.completion_id is None and out.conversation_id is None:
        raise bad("completion_id", "missing field (or give conversation_id)")
    if out.role is not None and out.role not in ("system", "user", "assistant", "tool"):
        raise bad("role", f"expected system, user, assistant or tool, got {out.role!r}")
    out.choice = _int(obj, "choice", 0, None) or 0
    if obj.get("reward") is not None:
        out.reward = _number(obj, "reward", 0.0, -1e9, 1e9)
    if not out.text and out.reward is None:
        raise bad("text", "feedback needs a text, a reward, or both")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise bad("meta", "expected an object")
    out.meta = meta
    return out
