"""The server-sent events of a streamed chat completion. Knows no model and no store.

A streaming request (`stream: true`) gets its events as the tokens are drawn: a role chunk per
choice, then content deltas (`record.StreamedContent`: text that is settled, never a stop string,
an end-of-turn token or a tool call's text; a thinking model's reasoning as `reasoning_content`), and once the exchange is committed, the rest of each
choice's content, its tool calls, its finish reason, a usage chunk (with `stream_options.include_usage`:
every chunk before it has `usage: null`, as OpenAI sends them) and `[DONE]`. What a client may
rely on: a chunk with a `finish_reason` (and `[DONE]`) is sent only after the exchange is
committed, so it is recorded exactly as streamed; content chunks alone are what the model was
drawing, and a stream cut before the finish reason (a dropped connection, a killed server) may or
may not have been recorded. With `logprobs: true`, a chunk carries the `logprobs` entries of the
tokens drawn since the last chunk (the choice's last chunks: the rest); joined, they are the
non-streamed response's. A failure after the stream began is an `error` event, without `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json

from dostream.serve.logprobs import entry
from dostream.serve.protocol import ApiError
from dostream.serve.record import StreamedContent

FINGERPRINT = "dostream-serve"


async def drawn(done: asyncio.Future, tokens: asyncio.Queue):
    """The tokens of a request as the sampling thread queues them, until its exchange is committed
    (`done`), then those drawn before the commit and queued behind it: what every stream sends."""
    while not done.done():
        get = asyncio.ensure_future(tokens.get())
        await asyncio.wait({get, done}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            break
        yield get.result()
    while not tokens.empty():
        yield tokens.get_nowait()


async def chat_events(
    head: dict, done: asyncio.Future, tokens: asyncio.Queue, live: list[StreamedContent], *, usage: bool
):
    """The OpenAI chunk stream of a completion as it is drawn: a role chunk per choice, content
    deltas as tokens arrive; once the exchange is committed (`done`), per choice the rest of its
    content, its tool calls and its finish reason; a usage chunk (`usage`); `[DONE]`."""
    if usage:
        head = {**head, "usage": None}

    # With logprobs asked for, each token's entry waits here until a chunk covers its token: a
    # content chunk takes those drawn so far, the choice's last chunks the rest (held-back text,
    # the end-of-turn token), so the chunks' entries join to the non-streamed response's.
    held: list[list[dict] | None] = [None] * len(live)

    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        entries, held[index] = held[index], ([] if held[index] is not None else None)
        logprobs = None if entries is None else {"content": entries}
        body = {
            **head,
            "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(item: tuple) -> str | None:
        choice, token, *scored = item  # (choice, token[, (logprob, top)])
        if scored:
            held[choice] = (held[choice] or []) + [entry(live[choice].tok, token, *scored[0])]
        new = live[choice].push(token)
        return chunk(choice, new) if new else None

    for c in range(len(live)):
        yield chunk(c, {"role": "assistant", "content": ""})
    async for item in drawn(done, tokens):
        if (out := delta(item)) is not None:
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
            yield chunk(index, rest)
        for k, call in enumerate(message.get("tool_calls") or []):
            yield chunk(index, {"tool_calls": [{"index": k, **call}]})
        yield chunk(index, {}, c["finish_reason"])
    if usage:
        last = {**head, "object": "chat.completion.chunk", "choices": [], "usage": exchange.request["usage"]}
        yield f"data: {json.dumps(last)}\n\n"
    yield "data: [DONE]\n\n"
