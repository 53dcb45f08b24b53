"""Event-driven sessions (`WS /v1/realtime`): listen while thinking, speak while thinking, be
interrupted, and record what was heard. Knows no HTTP: the route hands it the client's events and
sends what it returns.

A session is one conversation (one stream), driven by the text subset of OpenAI's Realtime API
events, with dostream's `input_text_buffer.*` shaped on `input_audio_buffer.*`:

    client → server                                 server → client
    session.update {session: {instructions,         session.created, session.updated
      temperature, max_response_output_tokens,
      prefill: "streamed" | "on_commit"}}
    input_text_buffer.append {delta}                (a user chunk; during an answer it interrupts it)
    input_text_buffer.commit / .clear               input_text_buffer.committed, conversation.item.created
    conversation.item.create {item: user message}   conversation.item.created
    response.create {response: {max_output_tokens,  response.created, response.output_item.added,
      temperature, instructions}}                   response.output_text.delta ..., response.output_text.done,
                                                    response.output_item.done, response.done
    response.cancel                                 response.done {status: "cancelled"}
    conversation.item.truncate {item_id,            conversation.item.truncated
      content_index, text_end}
                                                    error {error: {type, code, message, param, event_id}}

**Listen while thinking.** With `prefill: "streamed"` (the default) the typed text is prefilled
into the server's prefix cache as it arrives (`Batcher.warm`, riding a decode step, the sessions
waiting then prefilled together), once `--prefill-ahead-tokens` new tokens have come (coalesced:
each prefill ahead re-extends the session's cached prefix) or the input has paused for
`--prefill-ahead-idle-ms`: the prompt the
session's next answer will have, up to the user's text so far less its last word (a word still
being typed may tokenize otherwise once it ends), so at `response.create` only the text since the
last prefill and the template's closing are left. `on_commit` prefills nothing ahead (the
baseline `benchmarks/realtime.py` compares against). Thinking while listening (hidden tokens
between chunks) is not done.

**Speak while thinking, and be interrupted.** An answer's text streams out as it is drawn. A user
event during it (`input_text_buffer.append`, `response.cancel`) cancels it (`Batcher.cancel`: its
rows end at the next decode step) and the answer is recorded with what was drawn; the tokens whose
text was sent before the cancel are `meta.delivered_tokens` of its agent segment (`delivered_chars`
their characters). `conversation.item.truncate` with `text_end` (characters of the answer the user
actually saw or heard; dostream's text counterpart of `audio_end_ms`) records less
(`session_log.SessionLog.add_delivery`, applied when the conversation is exported).

**Provenance.** Each committed user item is one `user` segment (`meta.chunks`: each chunk's
arrival, seconds since the session began, and the character it ends at), recorded the moment it is committed
(`SessionLog.add_item`), then again as the new segments of the exchange that answers it. Each
answer is an exchange of the conversation, its agent segment the exact sampled ids. The next
answer's prompt is the recorded stream rendered (`Renderer(tok, chat_template=True)`), undelivered
tokens included: they are in the model's context; the world saw only the delivered ones
(docs/design.md, "Interrupted turns").
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from dostream.render import Renderer, RenderError, decode
from dostream.sampling import Sample, SamplingConfig, agent_segment
from dostream.serve.batcher import Job, Overloaded
from dostream.serve.record import settled
from dostream.serve.store import Exchange
from dostream.stream import Segment, Stream

PREFILL = ("streamed", "on_commit")
_LAST_WORD = re.compile(r"\S*$")


class SessionError(Exception):
    """A client event the session refuses: sent as an `error` event; the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass
class Answer:
    """A response being drawn: its job, what was sent of it, and whether it was cancelled."""

    id: str
    item: str
    job: Job
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text sent to the client so far
    cancelled: bool = False
    frozen: str | None = None  # what had been sent when it was cancelled: all it delivered


class SessionPending:
    """One answer to record (the batcher's commit thread calls `exchange`)."""

    def __init__(self, session: Session, answer_id: str, new: list[Segment], parent, settings: dict, prompt_len: int):
        self.session, self.id, self.new, self.parent = session, answer_id, new, parent
        self.settings, self.prompt_len = settings, prompt_len
        self.answer: Answer | None = None

    def exchange(self, samples: list[Sample], adapter: str | None) -> Exchange:
        [s] = samples
        meta: dict[str, Any] = {"finish_reason": s.finish_reason, "endpoint": "realtime"}
        if self.answer is not None and self.answer.frozen is not None:  # interrupted: what reached the user
            tokens, chars = self.session.delivered(s.token_ids, len(self.answer.frozen))
            meta.update(delivered_tokens=tokens, delivered_chars=chars)
        usage = {"prompt_tokens": self.prompt_len, "completion_tokens": len(s.token_ids)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return Exchange(
            id=self.id,
            conversation=self.session.conversation,
            parent=self.parent,
            parent_choice=None if self.parent is None else 0,
            segments=self.new,
            samples=[agent_segment(s, role="assistant", meta=meta)],
            request={**self.settings, "choices": [{"index": 0, "finish_reason": s.finish_reason}], "usage": usage},
            adapter=adapter,
            api_key=self.session.key,
        )


class Session:
    """One session's state; `handle(event)` is an async generator of the events to send."""

    def __init__(self, server, key: str):
        self.server, self.key = server, key
        self.id = "sess_" + secrets.token_hex(8)
        self.conversation = "conv-" + secrets.token_hex(8)
        self.started = time.time()
        self.renderer = Renderer(server.tok, chat_template=True)
        limits = server.cfg.limits
        self.settings: dict[str, Any] = {
            "instructions": None,
            "temperature": 0.8,
            "max_response_output_tokens": limits.default_max_tokens,
            "prefill": "streamed",
        }
        self.path: list[Segment] = []  # the recorded stream: what the next prompt renders
        self.parent: int | None = None  # the last answer's exchange seq
        self.items: list[Segment] = []  # committed user segments not yet answered
        self.chunks: list[tuple[float, str]] = []  # the input buffer: (arrival, text)
        self.answer: Answer | None = None
        self.answers: dict[str, int] = {}  # item id -> exchange seq (truncate)
        self._warming: asyncio.Future | None = None
        self._rewarm: str | None = None  # a chunk came while a prefill ahead ran: "more" (or "idle") after it
        self._idle: asyncio.TimerHandle | None = None  # the prefill ahead when the input pauses
        self._warmed_chars = 0  # of the input buffer, prefilled ahead

    # -- the session's own view -------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"id": self.id, "object": "realtime.session", "model": self.server.cfg.model, **self.settings}

    def delivered(self, ids: list[int], chars: int) -> tuple[int, int]:
        """The leading tokens of `ids` whose text lies within its first `chars` characters."""
        k = 0
        while k < len(ids) and len(decode(self.server.tok, ids[: k + 1])) <= chars:
            k += 1
        return k, len(decode(self.server.tok, ids[:k]))

    def _context(self) -> list[Segment]:
        """The segments the next answer adds before the user's: the instructions, once."""
        if self.path or not self.settings["instructions"]:
            return []
        return [Segment("context", self.settings["instructions"], role="system")]

    def _user_segments(self, chunks: list[tuple[float, str]], item: str) -> list[Segment]:
        """A committed item: one `user` segment (the message tokenizes as one text, as it will be
        rendered), its chunks' arrival times and ends in `meta.chunks` ([seconds since the session
        began, end character], in order)."""
        ends, at = [], 0
        for t, text in chunks:
            at += len(text)
            ends.append([round(t - self.started, 3), at])
        return [Segment("user", "".join(t for _, t in chunks), meta={"item": item, "chunks": ends})]

    # -- events -----------------------------------------------------------------------------
    async def handle(self, event: dict):
        kind = event.get("type")
        if not isinstance(kind, str):
            raise SessionError("invalid_event", "type: missing field", "type")
        method = getattr(self, "_on_" + kind.replace(".", "_"), None)
        if method is None:
            raise SessionError("invalid_event", f"type: {kind!r} is not an event dostream's sessions take", "type")
        async for out in method(event):
            yield out

    async def _on_session_update(self, event: dict):
        new = event.get("session") or {}
        if not isinstance(new, dict):
            raise SessionError("invalid_value", "session: expected an object", "session")
        limits = self.server.cfg.limits
        for key, value in new.items():
            if key == "instructions" and (value is None or isinstance(value, str)):
                self.settings[key] = value
            elif key == "temperature" and isinstance(value, int | float) and 0 <= value <= 2:
                self.settings[key] = float(value)
            elif key == "max_response_output_tokens" and _count(value, limits.max_tokens):
                self.settings[key] = value
            elif key == "prefill" and value in PREFILL:
                self.settings[key] = value
            elif key in ("instructions", "temperature", "max_response_output_tokens", "prefill"):
                raise SessionError("invalid_value", f"session.{key}: {value!r} is not allowed", f"session.{key}")
        yield {"type": "session.updated", "session": self.info()}

    async def _on_input_text_buffer_append(self, event: dict):
        delta = event.get("delta")
        if not isinstance(delta, str) or not delta:
            raise SessionError("invalid_value", "delta: expected a non-empty string", "delta")
        async for out in self._interrupt():
            yield out
        self.chunks.append((time.time(), delta))
        if self.settings["prefill"] == "streamed":
            self._warm()
            self._pause_timer()

    async def _on_input_text_buffer_clear(self, event: dict):
        self.chunks, self._warmed_chars = [], 0
        self._pause_timer(stop=True)
        yield {"type": "input_text_buffer.cleared"}

    async def _on_input_text_buffer_commit(self, event: dict):
        if not self.chunks:
            raise SessionError("input_text_buffer_commit_empty", "the input text buffer is empty")
        chunks, self.chunks, self._warmed_chars = self.chunks, [], 0
        self._pause_timer(stop=True)
        async for out in self._commit(chunks):
            yield out
        yield {"type": "input_text_buffer.committed", "item_id": self._last_item}

    async def _on_conversation_item_create(self, event: dict):
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message" or item.get("role") != "user":
            raise SessionError("invalid_value", "item: only user messages are taken", "item")
        parts = item.get("content")
        if not isinstance(parts, list) or not all(isinstance(p, dict) and p.get("type") == "input_text" for p in parts):
            raise SessionError("invalid_value", "item.content: expected input_text parts", "item.content")
        text = "".join(str(p.get("text", "")) for p in parts)
        if not text:
            raise SessionError("invalid_value", "item.content: empty", "item.content")
        async for out in self._interrupt():
            yield out
        async for out in self._commit([(time.time(), text)]):
            yield out

    async def _commit(self, chunks: list[tuple[float, str]]):
        item = "item_" + secrets.token_hex(8)
        segments = self._user_segments(chunks, item)
        self._check_text("".join(t for _, t in chunks))
        await asyncio.to_thread(self.server.store.sessions.add_item, self.conversation, self.parent, segments)
        self.items += segments
        self._last_item = item
        text = "".join(s.text for s in segments)
        yield {
            "type": "conversation.item.created",
            "item": {"id": item, "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
        }

    def _check_text(self, text: str) -> None:
        hit = next((t for t in self.server.tok.all_special_tokens if t and t in text), None)
        if hit is not None:
            raise SessionError("invalid_value", f"the text contains the tokenizer's special token {hit!r}", "delta")

    async def _on_response_cancel(self, event: dict):
        if self.answer is None:
            raise SessionError("response_cancel_not_active", "there is no answer in progress")
        async for out in self._interrupt():
            yield out

    def cancel(self) -> Answer | None:
        """Cancel the answer in progress, if any (it ends at the next decode step with what it
        drew; what was sent until now is all it delivered); returns it. (The socket closing calls
        it too: no prefill ahead waits for a pause any more.)"""
        self._pause_timer(stop=True)
        a = self.answer
        if a is not None and not a.cancelled:
            a.cancelled, a.frozen = True, a.sent
            self.server.batcher.cancel(a.job)
        return a

    async def _interrupt(self):
        """Cancel the answer in progress (if any) and wait for its end to be sent."""
        a = self.cancel()
        if a is not None:
            while self.answer is a:  # its `response.done` comes from its own task
                await asyncio.sleep(0.005)
        return
        yield  # (an async generator that sends nothing itself)

    async def _on_conversation_item_truncate(self, event: dict):
        item = event.get("item_id")
        if item not in self.answers:
            raise SessionError("invalid_value", f"item_id: {item!r} is not an answer of this session", "item_id")
        end = event.get("text_end")
        if isinstance(end, bool) or not isinstance(end, int) or end < 0:
            param = "audio_end_ms" if "audio_end_ms" in event else "text_end"
            raise SessionError("invalid_value", f"{param}: expected text_end, a number of characters >= 0", param)
        seq = self.answers[item]
        [sample] = [s for s in self.path if s.meta.get("item") == item]
        heard = min(end, sample.meta.get("delivered_chars", len(sample.text)))
        tokens, chars = self.delivered(sample.token_ids, heard)
        await asyncio.to_thread(self.server.store.sessions.add_delivery, seq, tokens, chars)
        sample.meta.update(delivered_tokens=tokens, delivered_chars=chars)
        yield {"type": "conversation.item.truncated", "item_id": item, "content_index": 0, "text_end": chars}

    async def _on_response_create(self, event: dict):
        if self.answer is not None:
            raise SessionError("conversation_already_has_active_response", "an answer is in progress")
        spec = event.get("response") or {}
        if not isinstance(spec, dict):
            raise SessionError("invalid_value", "response: expected an object", "response")
        limits = self.server.cfg.limits
        budget = spec.get("max_output_tokens", self.settings["max_response_output_tokens"])
        if not _count(budget, limits.max_tokens):
            raise SessionError("invalid_value", f"response.max_output_tokens: at most {limits.max_tokens}", "response")
        temperature = spec.get("temperature", self.settings["temperature"])
        new = self._context() + self.items
        try:
            prompt = self.renderer.prompt_ids(Stream(self.conversation, self.path + new))
        except RenderError as e:
            raise SessionError("invalid_value", str(e)) from None
        if len(prompt) + budget > self.server.context:
            raise SessionError("invalid_value", f"the session is {len(prompt)} tokens: past the model's context")
        answer_id, item = "resp_" + secrets.token_hex(12), "item_" + secrets.token_hex(8)
        config = SamplingConfig(
            temperature=temperature,
            max_new_tokens=budget,
            seed=secrets.randbits(63),
            greedy=temperature == 0,
            fast_step=self.server.cfg.fast_step,
        )
        settings = {"endpoint": "realtime", "session": self.id, "temperature": temperature, "max_tokens": budget}
        settings["seed"] = config.seed
        pending = SessionPending(self, answer_id, new, self.parent, settings, len(prompt))
        job = Job(prompt, 1, config, pending)
        tokens: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.on_token = lambda _c, token, *_: loop.call_soon_threadsafe(tokens.put_nowait, token)
        try:
            future = self.server.batcher.submit(job)
        except Overloaded as e:
            raise SessionError("server_overloaded", f"server overloaded: {e}; retry later") from None
        pending.answer = self.answer = Answer(answer_id, item, job)
        self.items = []
        yield {
            "type": "response.created",
            "response": {"id": answer_id, "object": "realtime.response", "status": "in_progress"},
        }
        yield {
            "type": "response.output_item.added",
            "response_id": answer_id,
            "item": {"id": item, "type": "message", "role": "assistant", "status": "in_progress", "content": []},
        }
        self._drawing = asyncio.ensure_future(self._draw(pending, asyncio.wrap_future(future), tokens))

    async def _draw(self, pending: SessionPending, done: asyncio.Future, tokens: asyncio.Queue) -> None:
        """The answer's events as its tokens are drawn, then its end (sent through `self.out`)."""
        from dostream.serve.events import drawn

        a = pending.answer
        markers = [m for m in (decode(self.server.tok, [e]) for e in sorted(self.server.eos)) if m]
        try:
            async for token in drawn(done, tokens):
                a.ids.append(token)
                if a.cancelled:
                    continue  # drawn after the interruption: never sent
                text = settled(decode(self.server.tok, a.ids), markers)
                if len(text) > len(a.sent) and text.startswith(a.sent):
                    delta, a.sent = text[len(a.sent) :], text
                    await self.out(
                        {"type": "response.output_text.delta", "response_id": a.id, "item_id": a.item, "delta": delta}
                    )
            samples, exchange = await done
        except Exception as e:  # failed: an error event; the session goes on without this answer
            self.answer = None
            self.items = [s for s in pending.new if s.author == "user"] + self.items  # still to answer
            await self.out(_error("server_error", f"internal error: {type(e).__name__}: {e}"))
            return
        [s] = samples
        seq = (await asyncio.to_thread(self.server.store.exchange, a.id))[0]
        agent = exchange.samples[0]
        agent.meta["item"] = a.item
        self.path += pending.new + [agent]
        self.parent, self.answers[a.item] = seq, seq
        status = (
            "cancelled"
            if s.finish_reason == "cancelled"
            else ("incomplete" if s.finish_reason == "length" else "completed")
        )
        if status != "cancelled":  # the rest of the text, held back while it could have been an end marker
            text = settled(decode(self.server.tok, s.token_ids), markers)
            if len(text) > len(a.sent) and text.startswith(a.sent):
                await self.out(
                    {
                        "type": "response.output_text.delta",
                        "response_id": a.id,
                        "item_id": a.item,
                        "delta": text[len(a.sent) :],
                    }
                )
                a.sent = text
        content = [{"type": "output_text", "text": a.sent}]
        item = {"id": a.item, "type": "message", "role": "assistant", "status": status, "content": content}
        await self.out({"type": "response.output_text.done", "response_id": a.id, "item_id": a.item, "text": a.sent})
        await self.out({"type": "response.output_item.done", "response_id": a.id, "item": item})
        usage = exchange.request["usage"]
        response = {
            "id": a.id,
            "object": "realtime.response",
            "status": status,
            "output": [item],
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
            },
        }
        if status == "cancelled":
            response["status_details"] = {"type": "cancelled", "reason": "client_cancelled"}
        self.answer = None
        await self.out({"type": "response.done", "response": response})

    # -- listening: prefill ahead ----------------------------------------------------------
    def _warm(self, idle: bool = False) -> None:
        """Prefill the next prompt up to the text typed so far (less its last word) once
        `prefill_ahead_tokens` new tokens have come (`idle`: any), one at a time: a chunk that
        arrives while one prefills asks for one more after it."""
        if self._warming is not None and not self._warming.done():
            self._rewarm = "idle" if idle else self._rewarm or "more"
            return
        typed = "".join(t for _, t in self.chunks)
        stable = typed[: _LAST_WORD.search(typed).start()].rstrip()
        new, least = stable[self._warmed_chars :], 1 if idle else self.server.cfg.prefill_ahead_tokens
        # (a token is a character or more: fewer characters are fewer tokens, untokenized)
        if len(new) < least or len(self.server.tok(new, add_special_tokens=False)["input_ids"]) < least:
            return
        self._warmed_chars = len(stable)
        ids = self._typed_ids(stable)
        if not ids:
            return
        self._rewarm = None
        self._warming = asyncio.wrap_future(self.server.batcher.warm(ids))
        self._warming.add_done_callback(self._warmed)

    def _warmed(self, fut: asyncio.Future) -> None:
        if self._rewarm:
            self._warm(idle=self._rewarm == "idle")

    def _pause_timer(self, stop: bool = False) -> None:
        """(Re)start the wait for a pause in the input (`prefill_ahead_idle_ms`), then prefill what is left."""
        if self._idle is not None:
            self._idle.cancel()
        wait = self.server.cfg.prefill_ahead_idle_ms / 1000
        self._idle = None if stop or wait <= 0 else asyncio.get_running_loop().call_later(wait, self._warm, True)

    def _typed_ids(self, stable: str) -> list[int]:
        """The ids the next prompt will begin with, up to the end of `stable` (the user's text so
        far, whole words): the prompt rendered with it as the user's message, cut before the
        template's closing of that message."""
        segments = self.path + self._context() + self.items + [Segment("user", stable)]
        try:
            r = self.renderer.render(Stream(self.conversation, segments), add_generation_prompt=True)
        except RenderError:
            return []
        end = r.text.rfind(stable) + len(stable)
        out = []
        for i, o in enumerate(r.offsets):
            if o is not None and o[1] > end:
                break
            out.append(r.input_ids[i])
        return out[:-1]  # one token short: its logits are not needed, and it may merge with what follows

    async def out(self, event: dict) -> None:
        """Replaced by the route: sends an event to the client."""
        raise NotImplementedError


def _count(v: Any, most: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= most


def _error(code: str, message: str, param: str | None = None, event_id: str | None = None) -> dict:
    return {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": param,
            "event_id": event_id,
        },
    }


def error_event(e: SessionError, event: Any) -> dict:
    return _error(e.code, e.message, e.param, event.get("event_id") if isinstance(event, dict) else None)
