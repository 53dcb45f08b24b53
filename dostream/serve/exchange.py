"""A chat request → what the batcher samples and what the store records. Knows no HTTP and no threads.

`prepare` finds which recorded sample the request continues (hash chain of canonical messages),
turns the client's new messages into segments, renders the prompt from the recorded stream
(`Renderer(tok, chat_template=True).prompt_ids(stream)`, so the ids the model conditions on are the
ids a training run renders) and returns a `Pending` exchange: a plain object that holds everything
the record needs. The batcher's commit thread calls `Pending.exchange(samples, adapter)` and stores
the result in one transaction with its batch mates.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dostream.memory.store import Source
from dostream.render import Renderer, RenderError
from dostream.sampling import Sample, SamplingConfig, agent_segment
from dostream.sampling.grammar import Grammar, GrammarError, json_grammar, tool_grammar
from dostream.serve.protocol import ChatRequest, bad, not_found
from dostream.serve.record import (
    FieldError,
    canonical,
    continuation_key,
    lookup_keys,
    new_segments,
    prefix_states,
    reply,
)
from dostream.serve.store import DEFAULT_TENANT, Exchange
from dostream.stream import Segment, Stream


@dataclass
class Pending:
    """One prepared request: its prompt and sampling settings, and what recording it needs."""

    id: str
    conversation: str
    created: int
    prompt: list[int]
    n: int
    config: SamplingConfig
    settings: dict[str, Any]  # the request's settings, recorded with the exchange
    new: list[Segment]  # the world's segments new in the request
    parent: tuple[int, int] | None  # (exchange seq, choice) it continues
    states: list  # the messages' hash chain (continuation keys)
    tools: bool  # tools in force: tool-call blocks are not content
    grammar: Grammar | None  # the grammar every choice follows (`response_format`, `tool_choice`, strict tools)
    stop: tuple[str, ...]
    key: str  # the API key's id
    tok: Any
    tenant: str = DEFAULT_TENANT  # whose conversation: its store slice, its adapter (`serve/tenants.py`)

    def exchange(self, samples: list[Sample], adapter: str | None) -> Exchange:
        """The exchange to record: each choice's reply (content, tool calls, finish reason) and its
        `agent` segment with the exact sampled ids, and the continuation key of each choice."""
        choices, keys, segments = [], [], []
        for c, s in enumerate(samples):
            message, finish = reply(s, self.tok, self.stop, tools=self.tools, call_prefix=f"call_{self.id[9:17]}{c}_")
            choices.append({"index": c, "message": message, "finish_reason": finish})
            keys.append(continuation_key(self.states, message))
            meta: dict[str, Any] = {"finish_reason": s.finish_reason}
            if s.grammar is not None:  # provenance: every id was drawn under this grammar's mask
                meta["constrained_by"] = s.grammar
            if "tool_calls" in message:
                meta["tool_calls"] = message["tool_calls"]
            if s.logprobs is not None:  # asked for: the raw distribution's, not the one sampled from
                meta["logprobs"] = s.logprobs
                meta["logprobs_of"] = "raw: log_softmax of the logits, before temperature and top_p"
                meta["sampled_with"] = {"temperature": self.config.temperature, "top_p": self.config.top_p}
            segments.append(agent_segment(s, role="assistant", meta=meta))
        usage = {"prompt_tokens": len(self.prompt), "completion_tokens": sum(len(s.token_ids) for s in samples)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return Exchange(
            id=self.id,
            conversation=self.conversation,
            parent=None if self.parent is None else self.parent[0],
            parent_choice=None if self.parent is None else self.parent[1],
            segments=self.new,
            samples=segments,
            request={**self.settings, "choices": choices, "usage": usage},
            adapter=adapter,
            api_key=self.key,
            continuations=keys,
            tenant=self.tenant,
        )


class Preparer:
    """Requests → `Pending` exchanges, against one store, tokenizer and model context."""

    def __init__(
        self,
        store: Any,
        tok: Any,
        context: int,
        *,
        client_assistant: str,
        fast_step: bool,
        memory=None,
        tenant: str = DEFAULT_TENANT,
        system: Callable[[], str] = str,
    ):
        # `store`: the tenant's slice (`ServeStore.slice`): it continues only the tenant's conversations
        self.store, self.tok, self.context, self.tenant, self.system = store, tok, context, tenant, system
        self.client_assistant, self.fast_step = client_assistant, fast_step
        self.memory = memory  # `serve.memory.ServedMemory` (--memory): notes before the newest user message
        self.renderer = Renderer(tok, chat_template=True)
        self._special = [t for t in tok.all_special_tokens if t]

    def __call__(
        self, req: ChatRequest, conversation: str | None, key: str, *, parent: tuple[int, int] | None = None
    ) -> Pending:
        """`parent` (seq, choice), named by the client (the Responses API's `previous_response_id`):
        the request's messages follow that recorded choice (`conversation` must be its own); the
        hash chain goes on from its continuation key, so a later request that resends the whole
        history finds the same samples."""
        tools = req.tools_in_force
        self._no_special_tokens(req)
        if parent is not None and not self.store.owns_exchange(parent[0]):
            raise not_found("previous_response_id")  # another tenant's response: nothing of it is read
        conversation = self.store.qualify(conversation)  # a tenant's ids are its own (`Slice.qualify`)
        if conversation is not None and self.store.tenant_of(conversation) not in (None, self.tenant):
            raise not_found("conversation_id")  # another tenant's: as if it were not there
        start = None if parent is None else self.store.continuation_key(*parent)
        states = prefix_states(tools, req.messages, start=start)
        match = self.store.find_continuation(lookup_keys(req.messages, states), conversation)
        if match is None and parent is not None:
            match = (-1, *parent, conversation)
        try:
            if match is not None:
                at, seq, choice, found = match
                path = self.store.path_segments(seq, choice)
                new = new_segments(req.messages[at + 1 :], at + 1, None, self.client_assistant)
                parent: tuple[int, int] | None = (seq, choice)
                conversation = conversation or found
            else:
                path, parent = [], None
                new = new_segments(req.messages, 0, tools, self.client_assistant)
                conversation = conversation or "conv-" + secrets.token_hex(8)
                system = self.system()  # the tenant's system context opens each of its conversations
                if system:
                    new = [Segment("context", system, role="system"), *new]
        except FieldError as e:
            raise bad(e.field, e.reason) from None
        if self.memory is not None:
            new = self.memory.context(new, Source(conversation, req.user, key))
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
        grammar = self._grammar(req, tools)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        config = SamplingConfig(
            temperature=req.temperature,
            top_p=req.top_p,
            max_new_tokens=req.max_tokens,
            stop=req.stop,
            seed=seed,
            greedy=req.temperature == 0,
            fast_step=self.fast_step,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
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
            "parallel_tool_calls": req.parallel_tool_calls,
            "stream": req.stream,
            "logprobs": req.logprobs,
            "top_logprobs": req.top_logprobs,
            "user": req.user,
            "metadata": req.metadata,
        }
        if req.response_format is not None:
            settings["response_format"] = {k: v for k, v in req.response_format.items() if k != "param"}
        return Pending(
            id="chatcmpl-" + secrets.token_hex(12),
            conversation=conversation,
            created=int(time.time()),
            prompt=prompt,
            n=req.n,
            config=config,
            settings=settings,
            new=new,
            parent=parent,
            states=states,
            tools=tools is not None,
            grammar=grammar,
            stop=req.stop,
            key=key,
            tok=self.tok,
            tenant=self.tenant,
        )

    def _grammar(self, req: ChatRequest, tools: list[dict] | None) -> Grammar | None:
        """The grammar every choice follows (compiled once per tokenizer and schemas), or None:

        * `tool_choice` `required` or a named function: a call (one, or several with
          `parallel_tool_calls`) to one of the tools (that function), its arguments valid against
          the function's `parameters`, whether or not the tool is strict (as vLLM does);
        * `auto` with `response_format`: that JSON, or call(s);
        * `auto` with a strict tool or `parallel_tool_calls: false`: text that never opens a call,
          or text then the call(s) (a strict function's arguments follow its schema, another's are
          any JSON object);
        * `response_format` alone: that JSON.

        An invalid schema or a keyword llguidance does not implement is a 400 naming its field."""
        rf = req.response_format
        if not tools:
            if rf is None:
                return None
            try:
                return json_grammar(self.tok, rf["schema"])
            except GrammarError as e:
                raise bad(rf["param"], str(e)) from None
        forced = req.tool_choice not in ("auto", "none")
        if forced and rf is not None:
            raise bad(rf["param"].rsplit(".schema", 1)[0], "not supported together with a forced tool_choice")
        if not (forced or rf is not None or req.strict_tools or not req.parallel_tool_calls):
            return None
        named = req.tool_choice["function"]["name"] if isinstance(req.tool_choice, dict) else None
        pairs = [
            (t["function"]["name"], t["function"].get("parameters") if forced or strict else None)
            for t in tools
            if named in (None, t["function"]["name"])
            for strict in [t["function"]["name"] in req.strict_tools]
        ]
        reply = False if rf is None else rf["schema"]
        try:
            return tool_grammar(self.tok, pairs, required=forced, parallel=req.parallel_tool_calls, reply=reply)
        except GrammarError as e:
            names = [t["function"]["name"] for t in tools]
            field = req.tool_param.format(names.index(e.function)) if e.function in names else None
            raise bad(field or (rf["param"] if rf is not None else "tools"), str(e)) from None

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
