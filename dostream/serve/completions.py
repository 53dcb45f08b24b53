"""`POST /v1/completions`, OpenAI's legacy Completions API: raw prompts in, text (and log-probs) out.

What lm-evaluation-harness's `local-completions` model scores log-likelihoods through: `echo: true`,
`logprobs: N`, `max_tokens: 0`. A request goes: `parse_completion` (400 naming the field) → one
`CompletionPending` per prompt (its prompt ids are `Renderer(tok).prompt_ids` of the stream
`[context: prompt]`, so the ids the model conditions on are the ids a training run renders) → the
batcher (n choices per prompt, sampled and recorded like a chat request) → the response.

Log-probs: a prompt token's come from a scoring pass over the prompt (`dostream.scoring`, the way
every part of dostream scores; the first token's is null: nothing precedes it); a sampled token's
from the engine (`Sample.logprobs`, the distribution it was drawn from, before temperature and
top-p, from the forward that drew it).

Recorded: each prompt with `max_tokens > 0` is a new conversation: the prompt one `context`
segment (given text, never a training target), each choice an `agent` segment with its exact
sampled ids. A pure scoring call (`max_tokens: 0`) is not recorded: nothing was sampled, so there
is no action of the agent's to learn from, and an evaluation's thousands of scored prompts would
be conversations of context alone.

Streamed (`stream: true`): each choice's text as it is drawn (`text_completion` chunks; held back
while it could become a stop string or the end-of-turn token's text), then a chunk with its
finish reason once the exchange is committed, a usage chunk with `stream_options.include_usage`,
and `[DONE]`. With `echo` or `logprobs`, a choice comes whole in one chunk once it is drawn (its
text and log-probs as the response gives them), not token by token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from dostream.render import Renderer, decode
from dostream.sampling import Sample, SamplingConfig, agent_segment
from dostream.serve.batcher import Job, Overloaded
from dostream.serve.config import Limits
from dostream.serve.events import drawn
from dostream.serve.protocol import ApiError, _int, _number, _stop, bad, stream_options
from dostream.serve.record import settled
from dostream.serve.store import Exchange
from dostream.stream import Segment, Stream

MAX_LOGPROBS = 5  # OpenAI's bound on the legacy `logprobs`


@dataclass
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]  # each a choice set of its own
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = None
    user: str | None = None
    stream: bool = False
    include_usage: bool = False


def _ids(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompts(obj: dict) -> list[str | list[int]]:
    p = obj.get("prompt")
    if p is None:
        raise bad("prompt", "missing field")
    if isinstance(p, str) or _ids(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return list(p)
    if isinstance(p, list) and p and all(_ids(x) for x in p):
        return [list(x) for x in p]
    raise bad("prompt", "expected a string, a list of strings, a list of token ids or a list of lists of token ids")


def parse_completion(obj: Any, limits: Limits) -> CompletionRequest:
    """The request, or a 400 naming the field: what dostream cannot honour is refused, unknown
    fields are ignored (as OpenAI's own server does)."""
    if not isinstance(obj, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(obj).__name__}", param="body")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "missing field" if model is None else "expected a string")
    prompts = _prompts(obj)
    if obj.get("suffix") is not None:
        raise bad("suffix", "not supported by dostream serve")
    for k in ("presence_penalty", "frequency_penalty"):
        if obj.get(k) not in (None, 0, 0.0):
            raise bad(k, "not supported by dostream serve (only 0)")
    if obj.get("logit_bias"):
        raise bad("logit_bias", "not supported by dostream serve")
    n = _int(obj, "n", 1, limits.max_n) or 1
    best_of = _int(obj, "best_of", 1, None)
    if best_of is not None and best_of != n:
        raise bad("best_of", f"only best_of equal to n ({n}) is supported by dostream serve, got {best_of}")
    echo = obj.get("echo", False)
    if not isinstance(echo, bool):
        raise bad("echo", "expected a boolean")
    max_tokens = _int(obj, "max_tokens", 0, limits.max_tokens)
    max_tokens = 16 if max_tokens is None else max_tokens
    if max_tokens == 0 and not echo:
        raise bad("max_tokens", "0 is allowed only with echo (scoring the prompt)")
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "expected a boolean")
    user = obj.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "expected a string")
    return CompletionRequest(
        model=model,
        prompts=prompts,
        max_tokens=max_tokens,
        temperature=_number(obj, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(obj, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        n=n,
        stop=_stop(obj, limits),
        seed=_int(obj, "seed", -(2**63), 2**63 - 1),
        echo=echo,
        logprobs=_int(obj, "logprobs", 0, MAX_LOGPROBS),
        user=user,
        stream=stream,
        include_usage=stream_options(obj, stream),
    )


# -- tokens, offsets and log-probs ------------------------------------------------------------


def _pieces(text: str, offsets: list) -> tuple[list[str], list[int]]:
    """Each token's text and its offset in `text`: token i covers `text` from its start to the next
    token's start, so the tokens join to the text exactly. A token with no character of its own
    (a byte of a character split over tokens) is empty, at the offset where it stands."""
    starts: list[int] = []
    for i, o in enumerate(offsets):
        starts.append(0 if i == 0 else (starts[-1] if o is None else max(o[0], starts[-1])))
    ends = [*starts[1:], len(text)]
    return [text[s:e] for s, e in zip(starts, ends)], starts


def _spans(renderer: Renderer, ids: list[int]) -> tuple[str, list[str], list[int]]:
    """The decoding of ids (nothing skipped: `render.decode`), each token's text and offset."""
    text = decode(renderer.tok, ids)
    r = renderer.render(Stream("spans", [Segment("agent", text, token_ids=list(ids))]))
    return (text, *_pieces(text, r.offsets))


def score(model, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """log p(ids[i] | ids[:i]) for i >= 1 (`scoring.logprobs_at`'s numbers) and the `top` most
    likely tokens at each of those positions."""
    import torch

    from dostream.scoring import logits_at, target_logprobs

    with torch.inference_mode():
        t = torch.tensor([ids])
        logits = logits_at(model, t, torch.ones_like(t), torch.ones_like(t, dtype=torch.bool))
        chosen = target_logprobs(logits, t[0, 1:]).tolist()
        alts: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if top:
            values, idx = logits.float().log_softmax(-1).topk(top, dim=-1)
            alts = [list(zip(i.tolist(), v.tolist())) for i, v in zip(idx, values)]
    return chosen, alts


def _top(tok, alts: list[tuple[int, float]]) -> dict[str, float]:
    return {decode(tok, [i]): lp for i, lp in alts}


# -- one prompt: prepared, sampled, recorded ----------------------------------------------------


@dataclass
class CompletionPending:
    """One prompt of a request: its ids, sampling settings, and what recording it needs (the
    batcher's commit thread calls `exchange`)."""

    id: str
    conversation: str
    prompt: list[int]
    text: str  # the prompt's text: the `context` segment
    given_ids: bool  # the client sent ids (recorded in the segment's meta)
    n: int
    config: SamplingConfig | None  # None: nothing to sample (max_tokens 0)
    settings: dict[str, Any]
    key: str  # the API key's id
    tenant: str  # the key's tenant: its slice, its adapter (`serve/tenants.py`)
    scored: tuple[list[float], list[list[tuple[int, float]]]] | None = None  # the prompt's, once (`echo`)

    def exchange(self, samples: list[Sample], adapter: str | None) -> Exchange:
        meta: dict[str, Any] = {"endpoint": "completions"}
        if self.given_ids:
            meta["prompt_token_ids"] = list(self.prompt)
        agents = [agent_segment(s, meta={"finish_reason": s.finish_reason}) for s in samples]
        usage = {"prompt_tokens": len(self.prompt), "completion_tokens": sum(len(s.token_ids) for s in samples)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        finishes = [{"index": c, "finish_reason": _finish(s)} for c, s in enumerate(samples)]
        return Exchange(
            id=self.id,
            conversation=self.conversation,
            parent=None,
            parent_choice=None,
            segments=[Segment("context", self.text, meta=meta)],
            samples=agents,
            request={**self.settings, "choices": finishes, "usage": usage},
            adapter=adapter,
            api_key=self.key,
            tenant=self.tenant,
        )


def _finish(s: Sample) -> str:
    return "length" if s.finish_reason == "length" else "stop"


def _shown(s: Sample, eos: set[int]) -> int:
    """How many of a sample's tokens the client sees before a stop-string cut: all but an
    end-of-turn token it drew (returned as `finish_reason: "stop"`, not as text)."""
    ids = s.token_ids
    if s.finish_reason == "eos" and ids and ids[-1] in eos:
        return len(ids) - 1
    return len(ids)


def prepare(server, req: CompletionRequest, key: str) -> list[CompletionPending]:
    renderer = Renderer(server.tok, add_eos=False)
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    base = "cmpl-" + secrets.token_hex(12)
    settings = {
        "endpoint": "completions",
        "model": req.model,
        "n": req.n,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "max_tokens": req.max_tokens,
        "stop": list(req.stop),
        "seed": seed,
        "echo": req.echo,
        "logprobs": req.logprobs,
        "user": req.user,
    }
    config = None
    if req.max_tokens:
        config = SamplingConfig(
            temperature=req.temperature,
            top_p=req.top_p,
            max_new_tokens=req.max_tokens,
            stop=req.stop,
            seed=seed,
            greedy=req.temperature == 0,
            fast_step=server.cfg.fast_step,
            logprobs=req.logprobs,
        )
    vocab = len(server.tok)
    out = []
    for p, prompt in enumerate(req.prompts):
        where = "prompt" if len(req.prompts) == 1 else f"prompt[{p}]"
        if isinstance(prompt, str):
            ids, text = renderer.prompt_ids(Stream("prompt", [Segment("context", prompt)])), prompt
        else:
            bad_id = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad_id is not None:
                raise bad("prompt", f"{where}: token id {bad_id} is outside the vocabulary (0..{vocab - 1})")
            ids, text = list(prompt), decode(server.tok, prompt)
        if not ids:
            raise bad("prompt", f"{where}: empty: there is nothing to condition on")
        if len(ids) + req.max_tokens > server.context:
            field = "max_tokens" if req.max_tokens else "prompt"
            raise bad(
                field,
                f"{where} is {len(ids)} tokens; with max_tokens {req.max_tokens} it exceeds "
                f"the model's context of {server.context}",
            )
        out.append(
            CompletionPending(
                id=base if len(req.prompts) == 1 else f"{base}-{p}",
                conversation="conv-" + secrets.token_hex(8),
                prompt=ids,
                text=text,
                given_ids=not isinstance(prompt, str),
                n=req.n,
                config=config,
                settings=settings,
                key=key,
                tenant=server.tenants.of_key(key),
            )
        )
    return out


def _choice(server, req: CompletionRequest, pending: CompletionPending, sample: Sample | None, index: int) -> dict:
    """One choice of the response: its text (the prompt first with `echo`) and its log-probs."""
    tok, renderer = server.tok, Renderer(server.tok, add_eos=False)
    shown: list[int] = []
    if sample is not None:
        shown = sample.token_ids[: _shown(sample, server.eos)]
    text, toks, offsets = _spans(renderer, shown) if shown else ("", [], [])
    finish = "length" if sample is None else _finish(sample)
    if sample is not None and sample.finish_reason == "stop":  # cut at the stop string, as OpenAI
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=len(text))
        keep = sum(1 for o in offsets if o < cut) if cut else 0
        text, toks, offsets = text[:cut], toks[:keep], offsets[:keep]
        toks = [*toks[:-1], toks[-1][: cut - offsets[-1]]] if toks else toks
        shown = shown[:keep]
    prompt_text = pending.text if req.echo else ""
    out: dict[str, Any] = {"index": index, "text": prompt_text + text, "logprobs": None, "finish_reason": finish}
    if req.logprobs is None:
        return out
    tokens: list[str] = []
    offs: list[int] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if req.echo:
        if pending.scored is None:  # the prompt's log-probs: one scoring pass for all its choices
            pending.scored = score(server.tenants.get(pending.tenant).slot.get()[0], pending.prompt, req.logprobs)
        chosen, alts = pending.scored
        if pending.given_ids:
            ptext, ptoks, poffs = _spans(renderer, pending.prompt)
        else:
            r = renderer.render(Stream("prompt", [Segment("context", pending.text)]), add_generation_prompt=True)
            ptext = pending.text
            ptoks, poffs = _pieces(ptext, r.offsets)
        tokens, offs = ptoks, poffs
        lps = [None, *chosen[: len(pending.prompt) - 1]]
        tops = [None, *(_top(tok, a) for a in alts[: len(pending.prompt) - 1])]
    base = len(prompt_text)
    tokens += toks
    offs += [base + o for o in offsets]
    if shown:  # the engine's, from the forward that drew each token (`SamplingConfig.logprobs`)
        lps += list(sample.logprobs[: len(shown)])
        tops += [_top(tok, a[: req.logprobs]) for a in sample.top_logprobs[: len(shown)]]
    out["logprobs"] = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}
    return out


async def complete(server, body: Any, key: str) -> tuple[dict | AsyncIterator[str], dict[str, str]]:
    """The response body (streamed: its server-sent events) and headers of `POST /v1/completions`
    (the route is `serve/routes.py`'s)."""
    req = parse_completion(body, server.cfg.limits)
    if req.model != server.cfg.model:
        raise ApiError(404, f"The model '{req.model}' does not exist", param="model", code="model_not_found")
    pendings = await run_in_threadpool(prepare, server, req, key)
    live = req.stream and not req.echo and req.logprobs is None  # streamed token by token
    tokens: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    futures = []
    if req.max_tokens:
        for p, pending in enumerate(pendings):
            job = Job(pending.prompt, pending.n, pending.config, pending)
            if live:
                job.on_token = lambda choice, token, *_, p=p: loop.call_soon_threadsafe(
                    tokens.put_nowait, (p * req.n + choice, token)
                )
            try:
                futures.append(asyncio.wrap_future(server.batcher.submit(job)))
            except Overloaded as e:
                raise ApiError(503, f"server overloaded: {e}; retry later", type="server_error") from None
    head = {
        "id": pendings[0].id.rsplit("-", 1)[0] if len(pendings) > 1 else pendings[0].id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": server.cfg.model,
    }
    headers = {"X-Conversation-Id": pendings[0].conversation} if len(pendings) == 1 and req.max_tokens else {}
    done = asyncio.gather(*futures)
    if req.stream:
        return _events(server, req, pendings, done, tokens if live else None, head), headers
    results = [samples for samples, _ in await done] or [[None] * req.n for _ in pendings]
    choices = []
    for p, (pending, samples) in enumerate(zip(pendings, results)):
        for j, sample in enumerate(samples):
            choices.append(await run_in_threadpool(_choice, server, req, pending, sample, p * req.n + j))
    return {**head, "choices": choices, "usage": _usage(pendings, results)}, headers


def _usage(pendings: list[CompletionPending], results: list[list[Sample | None]]) -> dict[str, int]:
    prompt_tokens = sum(len(p.prompt) for p in pendings)
    completion = sum(len(s.token_ids) for samples in results for s in samples if s is not None)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _events(server, req, pendings, done: asyncio.Future, tokens: asyncio.Queue | None, head: dict):
    """The streamed response: text deltas as drawn (`tokens`: (choice index, token); None: each
    choice whole at the end), each choice's last chunk with its finish reason once committed, the
    usage chunk if asked, `[DONE]`."""

    def chunk(index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        body = {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    markers = [*req.stop, *(m for m in (decode(server.tok, [e]) for e in sorted(server.eos)) if m)]
    drawn_ids: dict[int, list[int]] = {}
    sent: dict[int, str] = {}
    if tokens is not None:
        async for index, token in drawn(done, tokens):
            ids = drawn_ids.setdefault(index, [])
            ids.append(token)
            text, before = settled(decode(server.tok, ids), markers), sent.get(index, "")
            if len(text) > len(before) and text.startswith(before):
                sent[index] = text
                yield chunk(index, text[len(before) :])
    try:
        results = [samples for samples, _ in await done] or [[None] * req.n for _ in pendings]
    except Exception as e:  # the request failed after the stream began: an error event, no [DONE]
        body = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
        yield f"data: {json.dumps(body)}\n\n"
        return
    for p, (pending, samples) in enumerate(zip(pendings, results)):
        for j, sample in enumerate(samples):
            c = await run_in_threadpool(_choice, server, req, pending, sample, p * req.n + j)
            before = sent.get(c["index"], "")
            rest = c["text"][len(before) :] if c["text"].startswith(before) else ""
            yield chunk(c["index"], rest, c["finish_reason"], c["logprobs"])
    if req.include_usage:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(pendings, results)})}\n\n"
    yield "data: [DONE]\n\n"
