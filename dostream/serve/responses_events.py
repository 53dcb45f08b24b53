"""A response's output items and the server-sent events of a streamed response (`stream: true`).

The events follow OpenAI's Responses stream, each with its `sequence_number`: `response.created`,
`response.in_progress`; as tokens are drawn (`record.StreamedContent`: settled text only, never a
stop string, an end-of-turn token or a tool call's text) an item is opened when its first text
arrives (`response.output_item.added`, `response.content_part.added`) and its deltas follow
(`response.reasoning_text.delta` for a thinking model's reasoning, `response.output_text.delta`);
once the exchange is committed, each item is finished (the rest of its text, `*.done` events,
`response.output_item.done`), each function call sent whole (`added`,
`response.function_call_arguments.delta`/`.done`, `done`), and last `response.completed` (or
`response.incomplete` when the output hit `max_output_tokens`) with the whole response. As in
chat, the last event is sent only after the exchange is committed; a failure after the stream
began is an `error` event.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from dostream.serve.events import drawn
from dostream.serve.protocol import ApiError
from dostream.serve.record import StreamedContent


def output_items(rid: str, choice: dict) -> list[dict[str, Any]]:
    """A choice's reply as Responses output items: its reasoning, its text, its function calls."""
    message, status = choice["message"], "incomplete" if choice["finish_reason"] == "length" else "completed"
    items = []
    if message.get("reasoning_content") is not None:
        items.append(_reasoning(rid, message["reasoning_content"], status))
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        items.append(_message(rid, message.get("content") or "", status))
    for call in calls:
        items.append(_call(call, call["function"]["arguments"], status))
    return items


def _reasoning(rid: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"type": "reasoning", "id": "rs_" + rid[5:], "summary": [], "content": content, "status": status}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _message(rid: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_text_part(text)]
    return {"type": "message", "id": "msg_" + rid[5:], "role": "assistant", "status": status, "content": content}


def _call(call: dict, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": "fc_" + call["id"],
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": arguments,
        "status": status,
    }


def finished(head: dict, exchange, output: list[dict] | None = None) -> dict[str, Any]:
    """The whole response once its exchange is committed (`output`: the items as streamed)."""
    choice = exchange.request["choices"][0]
    incomplete = choice["finish_reason"] == "length"
    usage = exchange.request["usage"]
    return {
        **head,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": output if output is not None else output_items(head["id"], choice),
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        },
    }


class _Items:
    """The items of one streamed response, in the order they were opened."""

    def __init__(self, rid: str):
        self.rid, self.seq, self.next = rid, 0, 0
        self.open: dict[str, int] = {}  # "reasoning" | "message" -> output index
        self.sent: dict[str, str] = {}
        self.done: dict[int, dict] = {}

    def event(self, kind: str, **body: Any) -> str:
        out = {"type": kind, "sequence_number": self.seq, **body}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(out, ensure_ascii=False)}\n\n"

    def index(self) -> int:
        self.next += 1
        return self.next - 1

    def add(self, kind: str) -> list[str]:
        """Open the reasoning or the message item (its empty content part)."""
        at = self.open[kind] = self.index()
        self.sent[kind] = ""
        if kind == "reasoning":
            item, part = _reasoning(self.rid, "", "in_progress"), {"type": "reasoning_text", "text": ""}
        else:
            item, part = _message(self.rid, None, "in_progress"), _text_part("")
        ids = {"item_id": item["id"], "output_index": at}
        return [
            self.event("response.output_item.added", output_index=at, item=item),
            self.event("response.content_part.added", **ids, content_index=0, part=part),
        ]

    def delta(self, kind: str, text: str) -> list[str]:
        if not text:
            return []
        out = [] if kind in self.open else self.add(kind)
        self.sent[kind] += text
        at = self.open[kind]
        item_id = ("rs_" if kind == "reasoning" else "msg_") + self.rid[5:]
        if kind == "reasoning":
            return [
                *out,
                self.event(
                    "response.reasoning_text.delta", item_id=item_id, output_index=at, content_index=0, delta=text
                ),
            ]
        ids = dict(item_id=item_id, output_index=at, content_index=0)
        return [*out, self.event("response.output_text.delta", **ids, delta=text, logprobs=[])]

    def finish(self, kind: str, item: dict) -> list[str]:
        """Close an open item with its final text (the rest of it sent first)."""
        text = item["content"][0]["text"] if item["content"] else ""
        sent = self.sent.get(kind, "")
        out = self.delta(kind, text[len(sent) :]) if text.startswith(sent) else []
        if kind not in self.open:
            out += self.add(kind)
        at = self.open[kind]
        ids = dict(item_id=item["id"], output_index=at, content_index=0)
        if kind == "reasoning":
            out.append(self.event("response.reasoning_text.done", **ids, text=text))
            part = {"type": "reasoning_text", "text": text}
        else:
            out.append(self.event("response.output_text.done", **ids, text=text, logprobs=[]))
            part = _text_part(text)
        out.append(self.event("response.content_part.done", **ids, part=part))
        out.append(self.event("response.output_item.done", output_index=at, item=item))
        self.done[at] = item
        return out

    def call(self, item: dict) -> list[str]:
        at = self.index()
        self.done[at] = item
        ids = dict(item_id=item["id"], output_index=at)
        return [
            self.event(
                "response.output_item.added", output_index=at, item={**item, "arguments": "", "status": "in_progress"}
            ),
            self.event("response.function_call_arguments.delta", **ids, delta=item["arguments"]),
            self.event("response.function_call_arguments.done", **ids, arguments=item["arguments"], name=item["name"]),
            self.event("response.output_item.done", output_index=at, item=item),
        ]


async def response_events(head: dict, done: asyncio.Future, tokens: asyncio.Queue, live: StreamedContent):
    """The Responses event stream of one response as it is drawn (see the module docstring)."""
    items = _Items(head["id"])

    def deltas(item: tuple[int, int]) -> list[str]:
        new = live.push(item[1])
        out = items.delta("reasoning", new.get("reasoning_content", ""))
        return out + items.delta("message", new.get("content", ""))

    yield items.event("response.created", response=head)
    yield items.event("response.in_progress", response=head)
    async for drawn_item in drawn(done, tokens):
        for out in deltas(drawn_item):
            yield out
    try:
        _, exchange = done.result()
    except Exception as e:  # the request failed after the stream began: an error event
        body = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()["error"]
        yield items.event("error", **body)
        return
    final = output_items(head["id"], exchange.request["choices"][0])
    kinds = {"reasoning": "reasoning", "message": "message"}
    for item in final:
        kind = kinds.get(item["type"])
        for out in items.finish(kind, item) if kind else items.call(item):
            yield out
    for kind, at in items.open.items():  # opened while drawing, absent from the reply: closed as sent
        if at not in items.done:
            closed = (_reasoning if kind == "reasoning" else _message)(head["id"], items.sent[kind], "completed")
            for out in items.finish(kind, closed):
                yield out
    response = finished(head, exchange, [items.done[i] for i in sorted(items.done)])
    kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
    yield items.event(kind, response=response)
