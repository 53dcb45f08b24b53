"""`dostream serve` against a real server on 127.0.0.1: the official `openai` client for what clients
do (chat, streaming, tools, n, feedback, 401), httpx for bad input, 32 clients at once, batch-mate
independence, provenance of what is recorded, and SIGKILL at random points (nothing acknowledged
lost, no half row). Tiny models, no download."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from conftest import run_cli, small_config

from dostream.render import Renderer
from dostream.sampling import SamplingConfig, cache_kwarg, sample
from dostream.serve.app import ServeConfig, Server
from dostream.serve.protocol import Limits
from dostream.serve.store import ServeStore
from dostream.stream import Stream, read_streams

KEY = "sk-test-admin"


@contextlib.contextmanager
def running(server: Server):
    """Serve `server.app()` with uvicorn on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    u = uvicorn.Server(uvicorn.Config(server.app(), log_level="warning"))
    thread = threading.Thread(target=u.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not u.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        u.should_exit = True
        thread.join(timeout=30)
        sock.close()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def decisive_model(tok, seed: int = 0):
    """conftest's small untied model with larger weights still (std 0.5): peaked distributions, so
    float rounding cannot flip a seeded draw."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = small_config(LlamaConfig, tok, max_position_embeddings=2048)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def served(tok, tmp_path_factory):
    store = tmp_path_factory.mktemp("serve")
    server = Server(
        ServeConfig(model="tiny", store=str(store), limits=Limits(max_body=64_000, max_tokens=64, max_n=4)),
        env_key=KEY,
        model=decisive_model(tok),
        tok=tok,
    )
    with running(server) as url:
        yield SimpleNamespace(url=url, server=server, store=server.store, dir=store)


def streams_of(store: ServeStore, conversation: str) -> list[Stream]:
    return store.conversation_streams(conversation)


def conv_of(raw) -> str:
    return raw.headers["x-conversation-id"]


# -- the OpenAI surface ----------------------------------------------------------------------------
def test_models_lists_the_served_name_and_other_models_are_404(served):
    c = client(served.url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_chat_records_exact_ids_and_the_next_turn_continues_the_stream(served, tok):
    c = client(served.url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=6, seed=3)
    first, conv = raw.parse(), conv_of(raw)
    assert first.usage.completion_tokens >= 1
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    # the message object as the SDK returns it, its None fields and all (what most clients send back)
    messages += [first.choices[0].message, {"role": "user", "content": "And then?"}]
    raw2 = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=6, seed=4)
    second = raw2.parse()
    assert conv_of(raw2) == conv  # found by its messages: no id was sent
    [stream] = streams_of(served.store, conv)
    assert [(s.author, s.role) for s in stream.segments] == [
        ("context", "system"),
        ("user", "user"),
        ("agent", "assistant"),
        ("user", "user"),
        ("agent", "assistant"),
    ]
    agent = [s for s in stream.segments if s.author == "agent"]
    assert all(s.token_ids for s in agent)
    assert agent[1].token_ids == [int(t) for t in agent[1].token_ids]
    # invariant 2: the prompt each turn was sampled from is the recorded stream's rendering
    renderer = Renderer(tok, chat_template=True)
    prefix = Stream(conv, stream.segments[:4])
    assert second.usage.prompt_tokens == len(renderer.prompt_ids(prefix))
    ids = renderer.render(stream).input_ids
    assert ids[: len(renderer.prompt_ids(prefix))] == renderer.prompt_ids(prefix)
    assert agent[1].token_ids == ids[len(renderer.prompt_ids(prefix)) :][: len(agent[1].token_ids)]
    assert stream.meta["completions"] == [first.id, second.id] and stream.meta["turns"] == 2


def test_same_seed_same_answer_and_greedy(served):
    c = client(served.url)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Count"}], max_tokens=8)
    a = c.chat.completions.create(seed=11, temperature=0.9, top_p=0.9, **ask)
    b = c.chat.completions.create(seed=11, temperature=0.9, top_p=0.9, **ask)
    assert a.choices[0].message.content == b.choices[0].message.content
    g = [c.chat.completions.create(temperature=0, **ask).choices[0].message.content for _ in range(2)]
    assert g[0] == g[1]


def test_a_clients_own_assistant_message_is_teacher_and_stop_strings_cut(served):
    c = client(served.url)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello! I wrote this myself."}]},
        {"role": "user", "content": "ok"},
    ]
    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=8, seed=1)
    [stream] = streams_of(served.store, conv_of(raw))
    assert [s.author for s in stream.segments] == ["user", "teacher", "user", "agent"]
    sampled = stream.segments[-1]
    again = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=1)
    assert again.choices[0].message.content == sampled.text.removesuffix("<|im_end|>")
    # a stop string the model writes (its 3rd token's text): cut from the content, kept in the ids
    word = served.server.tok.decode(sampled.token_ids[2:3])
    assert word.strip() and word not in served.server.tok.decode(sampled.token_ids[:2])
    cut = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=1, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == served.server.tok.decode(sampled.token_ids[:2])
    assert cut.usage.completion_tokens == 3  # the ids that wrote the stop string are recorded


def test_streaming_sends_openai_chunks_then_done(served):
    c = client(served.url)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Stream please"}], max_tokens=8, seed=5)
    whole = c.chat.completions.create(**ask)
    chunks = list(c.chat.completions.create(stream=True, **ask))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream(
        "POST",
        served.url + "/v1/chat/completions",
        json={**ask, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_streamed_content_is_the_content_whatever_the_tokens(served):
    """Random byte-level tokens (broken UTF-8 included), stop strings, n=2: each choice's streamed
    deltas add up to its content, and its finish reason is the same."""
    c = client(served.url)
    reasons = set()
    for seed in range(6):
        ask = dict(model="tiny", messages=[{"role": "user", "content": f"seed {seed}"}], max_tokens=16, seed=seed)
        ask.update(n=2, stop=["e ", "the"], temperature=1.0)
        whole = c.chat.completions.create(**ask)
        parts, finish = ["", ""], [None, None]
        for ch in c.chat.completions.create(stream=True, **ask):
            for choice in ch.choices:
                parts[choice.index] += choice.delta.content or ""
                finish[choice.index] = choice.finish_reason or finish[choice.index]
        assert parts == [ch.message.content for ch in whole.choices]
        assert finish == [ch.finish_reason for ch in whole.choices]
        reasons.update(finish)
    assert reasons == {"stop", "length"}


def test_n_choices_branch_and_the_client_picks_one(served):
    c = client(served.url)
    messages = [{"role": "user", "content": "Pick one"}]
    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, n=3, max_tokens=6, seed=2)
    res, conv = raw.parse(), conv_of(raw)
    assert [ch.index for ch in res.choices] == [0, 1, 2]
    [samples] = served.store.db.execute("SELECT samples FROM exchanges WHERE id = ?", (res.id,)).fetchone()
    assert res.usage.completion_tokens == sum(len(s["token_ids"]) for s in json.loads(samples))
    messages += [res.choices[1].message.model_dump(exclude_none=True), {"role": "user", "content": "Why?"}]
    raw2 = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=4, seed=3)
    assert conv_of(raw2) == conv
    main, *branches = streams_of(served.store, conv)
    assert main.id == conv and main.meta["turns"] == 2  # the path the client went on with
    assert main.segments[1].text.startswith(res.choices[1].message.content)
    assert sorted(b.id for b in branches) == sorted(f"{conv}#{b.meta['branch']}" for b in branches)
    assert sorted(b.meta["branch"].split(".")[1] for b in branches) == ["0", "2"]


def test_a_named_conversation_and_feedback_append_with_their_authors(served):
    c = client(served.url)
    first = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "2+2?"}],
        max_tokens=4,
        metadata={"conversation_id": "quiz-1"},
    )
    fb = c.post(
        "/feedback",
        body={
            "completion_id": first.id,
            "author": "verifier",
            "kind": "verdict",
            "text": "Verdict: wrong.",
            "reward": 0.0,
        },
        cast_to=object,
    )
    assert fb["conversation_id"] == "quiz-1" and fb["id"].startswith("fb-")
    c.post(
        "/feedback",
        body={"conversation_id": "quiz-1", "author": "oracle", "text": "4", "reward": 1.0, "name": "grader"},
        cast_to=object,
    )
    [stream] = streams_of(served.store, "quiz-1")
    assert [s.author for s in stream.segments] == ["user", "agent", "verifier", "oracle"]
    assert stream.meta["reward"] == 1.0 and [f["author"] for f in stream.meta["feedback"]] == ["verifier", "oracle"]
    assert stream.meta["feedback"][1]["name"] == "grader"
    for body, status, param in [
        ({"completion_id": first.id, "author": "agent", "text": "x"}, 400, "author"),
        ({"completion_id": first.id, "author": "user"}, 400, "text"),
        ({"completion_id": "chatcmpl-nope", "author": "user", "text": "x"}, 404, "completion_id"),
        ({"conversation_id": "nope", "author": "user", "text": "x"}, 404, "conversation_id"),
        ({"completion_id": first.id, "author": "user", "text": "x", "choice": 3}, 400, "choice"),
    ]:
        r = httpx.post(served.url + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    [again] = streams_of(served.store, "quiz-1")
    assert len(again.segments) == 4  # refused feedback wrote nothing


# -- tools -----------------------------------------------------------------------------------------
class Scripted(torch.nn.Module):
    """Writes a fixed script whatever the prompt: the wrapped model fills the cache as usual, then
    every row's logits are a one-hot on the script's next token (step 0 at a prefill)."""

    def __init__(self, model, script: list[int]):
        super().__init__()
        self.model, self.config, self.script, self.steps = model, model.config, script, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, **kwargs):
        kw = {cache_kwarg(self.model): cache if cache is not None else kwargs.get("past_key_values")}
        self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kw)
        # A decode step runs on the sampler's reserved cache; a prefill (a whole prompt, or the rest
        # after a cached prefix, which may be one token) on another.
        layers = getattr(next(iter(kw.values())), "layers", None) or [None]
        self.steps = self.steps + 1 if type(layers[0]).__name__ == "ReservedLayer" else 0
        logits = torch.full((*input_ids.shape, self.config.vocab_size), -1e4)
        logits[..., self.script[min(self.steps, len(self.script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tool_server(tok, tmp_path_factory):
    from dostream.models import tiny_model

    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    script = tok(call, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    server = Server(
        ServeConfig(model="tiny", store=str(tmp_path_factory.mktemp("tools")), fast_step=False),
        env_key=KEY,
        model=Scripted(tiny_model(), script),
        tok=tok,
    )
    with running(server) as url:
        yield SimpleNamespace(url=url, server=server, store=server.store)


def test_tool_calls_come_back_in_the_openai_shape_and_the_tool_result_continues(tool_server):
    c = client(tool_server.url)
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=48)
    res, conv = raw.parse(), conv_of(raw)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add"
    assert json.loads(call.function.arguments) == {"a": 1, "b": 2}
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "3"},
    ]
    raw2 = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=48)
    assert conv_of(raw2) == conv
    [stream] = streams_of(tool_server.store, conv)
    assert [s.author for s in stream.segments] == ["context", "user", "agent", "tool", "agent"]
    assert stream.segments[0].meta["tools"][0]["function"]["name"] == "add"  # the tools preamble
    assert stream.segments[2].text.startswith("<tool_call>") and stream.segments[2].token_ids
    assert stream.segments[2].meta["tool_calls"][0]["function"]["name"] == "add"
    assert stream.segments[3].meta.get("tool_call_id") == call.id and stream.segments[3].text == "3"
    # streamed, the call arrives as a tool_calls delta
    chunks = list(
        c.chat.completions.create(model="tiny", messages=messages[:1], tools=TOOLS, max_tokens=48, stream=True)
    )
    deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas] == ["add"]
    # tool_choice none: no tools shown, no call parsed
    plain = c.chat.completions.create(
        model="tiny", messages=messages[:1], tools=TOOLS, tool_choice="none", max_tokens=48
    )
    assert plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content


def _tool_segment(store, completion_id):
    [samples] = store.db.execute("SELECT samples FROM exchanges WHERE id = ?", (completion_id,)).fetchone()
    return json.loads(samples)[0]


TWO_TOOLS = [*TOOLS, {"type": "function", "function": {"name": "mul", "description": "Multiply", "parameters": {}}}]


@pytest.mark.parametrize("choice", ["required", "mul"])
def test_tool_choice_required_or_named_forces_a_call_the_model_would_not_make(served, choice):
    """The decisive random model never writes the tool-call convention by itself; under
    `required` it must call one of the tools, under a named function that function. The forced
    opening is recorded as sampled ids of the agent's turn, counted in its meta."""
    c = client(served.url)
    ask = dict(
        model="tiny", messages=[{"role": "user", "content": "Compute something"}], tools=TWO_TOOLS, max_tokens=30
    )
    free = c.chat.completions.create(seed=9, **ask)
    assert free.choices[0].message.tool_calls is None  # left alone, it does not call
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    res = c.chat.completions.create(seed=9, tool_choice=tool_choice, n=2, **ask)
    for ch in res.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        [call] = ch.message.tool_calls
        assert call.function.name in ({"add", "mul"} if choice == "required" else {"mul"})
        assert isinstance(call.function.arguments, str)
    seg = _tool_segment(served.store, res.id)
    assert seg["text"].startswith('<tool_call>\n{"name": "') and seg["meta"]["constrained"] > 5
    assert seg["meta"]["tool_calls"][0]["function"]["name"] == res.choices[0].message.tool_calls[0].function.name
    # streamed: the call comes as a tool_calls delta, its text never as content
    chunks = list(c.chat.completions.create(seed=9, tool_choice=tool_choice, stream=True, **ask))
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    names = [d.function.name for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert len(names) == 1 and names[0] in {"add", "mul"}


def test_a_forced_call_with_arguments_that_are_not_json_is_still_a_call():
    from dostream.serve.record import _forced_call

    text = '<tool_call>\n{"name": "mul", "arguments": {"a": 2,, </tool_call>'
    call = _forced_call(text, "call_x0")
    assert call["function"] == {"name": "mul", "arguments": '{"a": 2,,'} and call["id"] == "call_x0"
    ok = _forced_call('<tool_call>\n{"name": "add", "arguments": {"a": 1} junk', "c")
    assert json.loads(ok["function"]["arguments"]) == {"a": 1}


# -- streaming and continuous batching, on a paced model -----------------------------------------
class Paced(torch.nn.Module):
    """A model whose every forward takes at least `pause` seconds, with the time each one ended."""

    def __init__(self, model, pause: float):
        super().__init__()
        self.model, self.config, self.pause, self.calls = model, model.config, pause, []

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        time.sleep(self.pause)
        self.calls.append(time.monotonic())
        return out


@pytest.fixture(scope="module")
def paced(tok, tmp_path_factory):
    from dostream.models import tiny_model

    script = tok(" one two three four five six seven eight nine ten eleven", add_special_tokens=False)["input_ids"]
    model = Paced(Scripted(tiny_model(), script), pause=0.05)
    server = Server(
        ServeConfig(model="tiny", store=str(tmp_path_factory.mktemp("paced")), fast_step=False),
        env_key=KEY,
        model=model,
        tok=tok,
    )
    with running(server) as url:
        yield SimpleNamespace(url=url, server=server, store=server.store, model=model)


def test_streaming_sends_tokens_as_they_are_drawn_and_finishes_after_the_commit(paced):
    c = client(paced.url)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Count"}], max_tokens=12, seed=1)
    arrivals, text, committed = [], "", None
    for ch in c.chat.completions.create(stream=True, **ask):
        if ch.choices and ch.choices[0].delta.content:
            arrivals.append(time.monotonic())
            text += ch.choices[0].delta.content
        if ch.choices and ch.choices[0].finish_reason:
            committed = paced.store.exchange(ch.id) is not None  # already in the store when the finish came
    generation_end = paced.model.calls[-1]
    assert len(arrivals) >= 6 and arrivals[0] < generation_end - 0.2  # chunks came while it was decoding
    assert committed
    whole = c.chat.completions.create(**ask)
    assert text == whole.choices[0].message.content and text.startswith(" one two three four five")


def test_a_request_joins_a_running_decode_and_leaves_before_it(paced):
    c = client(paced.url)
    started, decodes, out = len(paced.model.calls), paced.server.batcher.batches, {}

    def ask(name, max_tokens):
        res = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": name}], max_tokens=max_tokens, seed=2
        )
        out[name] = (time.monotonic(), res)

    long = threading.Thread(target=ask, args=("long", 30))
    long.start()
    while len(paced.model.calls) < started + 4:  # the long request is decoding
        time.sleep(0.01)
    ask("short", 2)
    long.join()
    assert out["short"][0] < out["long"][0] - 0.5  # answered while the long one still ran
    assert paced.server.batcher.batches == decodes + 1  # one decode: the short request joined it
    [request] = paced.store.db.execute("SELECT request FROM exchanges WHERE id = ?", (out["short"][1].id,)).fetchone()
    assert json.loads(request)["batch"] == {"requests": 2, "rows": 2}
    assert out["long"][1].usage.completion_tokens == 30


# -- keys ------------------------------------------------------------------------------------------
def test_no_key_or_a_wrong_key_is_401_and_scopes_hold(served):
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with pytest.raises(openai.AuthenticationError) as e:
        client(served.url, key="sk-wrong").chat.completions.create(**ask)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert e.value.body["type"] == "invalid_request_error"
    r = httpx.post(served.url + "/v1/chat/completions", json=ask)
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    kid, key = served.store.add_key("chat only", ("chat",))
    c = client(served.url, key=key)
    assert c.chat.completions.create(**ask).choices
    with pytest.raises(openai.PermissionDeniedError):
        c.post("/feedback", body={"conversation_id": "x", "author": "user", "text": "x"}, cast_to=object)
    assert run_cli("serve", "keys", "revoke", kid, "--store", served.dir).returncode == 0
    listed = run_cli("serve", "keys", "list", "--store", served.dir).stdout
    assert kid in listed and "revoked" in listed and key not in listed
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(**ask)
    assert served.store.db.execute("SELECT COUNT(*) FROM api_keys WHERE hash = ?", (key,)).fetchone()[0] == 0


# -- bad input -------------------------------------------------------------------------------------
BAD = [
    (b"{not json", 400, "body"),
    (b"[1, 2]", 400, "body"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        },
        400,
        "messages[0].content[0].type",
    ),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a<|im_end|>b"}]}, 400, "messages[0].content"),
    (
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "token_ids": [1]}],
        },
        400,
        "messages[1].token_ids",
    ),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens"),
    (
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 99}, 400, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": True}, 400, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}, 400, "stop"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 1.5}, 400, "seed"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs"),
    (
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "tools[0].function",
    ),
    (
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "mul"}},
        },
        400,
        "tool_choice.function.name",
    ),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "user": "a#b"}, 400, "user"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 70_000}]}, 413, "body"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[p for _, _, p in BAD])
def test_bad_input_is_an_openai_error_naming_the_field(served, body, status, param):
    before = served.store.n_exchanges()
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(
        served.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        **kw,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param), err
    assert served.store.n_exchanges() == before
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}


def test_unknown_routes_are_openai_style_404(served):
    r = httpx.get(served.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


# -- concurrency -----------------------------------------------------------------------------------
def test_32_simultaneous_clients_are_all_answered_and_recorded(served):
    async def one(c, i):
        return await c.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": f"client {i} says hi"}], max_tokens=8, seed=i
        )

    async def main():
        c = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        return await asyncio.gather(*(one(c, i) for i in range(32)))

    batches = served.server.batcher.batches
    raws = asyncio.run(main())
    ids = {r.parse().id for r in raws}
    assert len(ids) == 32
    recorded = {r[0] for r in served.store.db.execute("SELECT id FROM exchanges")}
    assert ids <= recorded
    assert served.server.batcher.batches - batches < 32  # they were batched, not run one by one


def test_a_seeded_request_samples_the_same_whatever_shares_its_batch(served, tok):
    probe = [{"role": "user", "content": "The probe question"}]
    ask = dict(model="tiny", max_tokens=12, temperature=1.0, seed=1234)
    c = client(served.url)
    alone = c.chat.completions.create(messages=probe, n=2, **ask)

    async def crowd():
        ac = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        others = [
            ac.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "other " * (i + 1)}], max_tokens=20, seed=i
            )
            for i in range(7)
        ]
        return await asyncio.gather(ac.chat.completions.create(messages=probe, n=2, **ask), *others)

    crowded = asyncio.run(crowd())[0]
    [request] = served.store.db.execute("SELECT request FROM exchanges WHERE id = ?", (crowded.id,)).fetchone()
    assert json.loads(request)["batch"]["requests"] > 1  # it did share its batch
    assert [ch.message.content for ch in crowded.choices] == [ch.message.content for ch in alone.choices]
    # and it is what `dostream sample --seed 1234 --n 2` draws for the same prompt
    prompt = Renderer(tok, chat_template=True).prompt_ids(Stream("p", [_seg("user", "The probe question")]))
    direct = sample(served.server.slot.get()[0], tok, [prompt] * 2, SamplingConfig(max_new_tokens=12, seed=1234))
    assert [s.text.removesuffix("<|im_end|>") for s in direct] == [ch.message.content for ch in alone.choices]


def test_bf16_serving_is_deterministic_and_records_what_it_drew(tok, tmp_path):
    """`--dtype bf16` (faster where the CPU has bf16 matmuls): what still holds is that a request
    samples the same alone every time, and what is recorded is exactly what it drew; beside other
    requests it holds up to bf16 rounding, coarser than fp32's (here a decisive model: the same)."""
    model = decisive_model(tok).to(torch.bfloat16)
    server = Server(ServeConfig(model="tiny", store=str(tmp_path), dtype="bf16"), env_key=KEY, model=model, tok=tok)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "bf16 probe"}], max_tokens=10, seed=4, n=2)
    with running(server) as url:
        c = client(url)
        first, again = c.chat.completions.create(**ask), c.chat.completions.create(**ask)

        async def crowd():
            ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
            others = [
                ac.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * i}], max_tokens=6)
                for i in range(1, 6)
            ]
            return (await asyncio.gather(ac.chat.completions.create(**ask), *others))[0]

        crowded = asyncio.run(crowd())
    contents = [[ch.message.content for ch in r.choices] for r in (first, again, crowded)]
    assert contents[0] == contents[1] == contents[2]
    [samples] = server.store.db.execute("SELECT samples FROM exchanges WHERE id = ?", (first.id,)).fetchone()
    texts = [tok.decode(s["token_ids"]).removesuffix("<|im_end|>") for s in json.loads(samples)]
    assert texts == contents[0]


def _seg(author, text):
    from dostream.stream import Segment

    return Segment(author, text, role="user")


# -- export ----------------------------------------------------------------------------------------
def test_streams_export_writes_the_servers_conversations(served, tok, tmp_path):
    c = client(served.url)
    c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "export me"}], max_tokens=4)
    out = tmp_path / "served.jsonl"
    proc = run_cli("streams", "export", served.dir, "--out", out)
    assert "streams" in proc.stderr
    streams = list(read_streams(out))
    assert len(streams) >= served.store.n_exchanges() // 4 and all(s.meta["source"] == "serve" for s in streams)
    renderer = Renderer(tok, chat_template=True)
    for s in streams:  # every exported stream renders, sampled ids checked against their text
        renderer.render(s)


# -- durability ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(store, port: int) -> subprocess.Popen:
    env = {**os.environ, "DOSTREAM_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dostream.cli", "serve", "--model", "tiny", "--store", str(store)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)


def _client_loop(url: str, rng: random.Random, acked: dict, fb_acked: set, convs: list, stop: threading.Event):
    """Chat (new conversations, or the next turn of an acknowledged one) and feedback until the
    server dies; record what was acknowledged."""
    c = client(url)
    while not stop.is_set():
        try:
            if convs and rng.random() < 0.5:
                messages = [*rng.choice(convs), {"role": "user", "content": f"more {rng.random():.3f}"}]
            else:
                messages = [{"role": "user", "content": f"start {rng.random():.3f}"}]
            res = c.chat.completions.create(
                model="tiny", messages=messages, max_tokens=rng.randint(1, 12), seed=rng.randrange(99)
            )
            acked[res.id] = res.choices[0].message.content
            convs.append([*messages, res.choices[0].message.model_dump(exclude_none=True)])
            if rng.random() < 0.3:
                fb = c.post(
                    "/feedback",
                    body={"completion_id": res.id, "author": "verifier", "text": "ok", "reward": 1.0},
                    cast_to=object,
                )
                fb_acked.add(fb["id"])
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError):
            return


def test_sigkill_at_random_points_loses_nothing_acknowledged(tmp_path, tok):
    rng = random.Random(21)
    store_dir = tmp_path / "store"
    acked: dict[str, str] = {}
    fb_acked: set[str] = set()
    convs: list[list[dict]] = []
    kills = int(os.environ.get("DOSTREAM_SERVE_KILLS", "2"))
    for _ in range(kills):
        port = _free_port()
        proc = _start(store_dir, port)
        stop = threading.Event()
        clients = [
            threading.Thread(
                target=_client_loop,
                args=(f"http://127.0.0.1:{port}", random.Random(rng.random()), acked, fb_acked, convs, stop),
            )
            for _ in range(4)
        ]
        for t in clients:
            t.start()
        time.sleep(rng.uniform(0.3, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        stop.set()
        for t in clients:
            t.join(timeout=60)
    assert acked, "no request was acknowledged before the kills"
    db = sqlite3.connect(store_dir / "serve.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    store = ServeStore.open_dir(store_dir)
    rows = {cid: json.loads(req) for cid, req in store.db.execute("SELECT id, request FROM exchanges")}
    # no half row: every exchange has its samples and one continuation key per choice
    for seq, samples in store.db.execute("SELECT seq, samples FROM exchanges"):
        keys = store.db.execute("SELECT COUNT(*) FROM continuations WHERE seq = ?", (seq,)).fetchone()[0]
        assert keys == len(json.loads(samples)) >= 1
    for cid, content in acked.items():
        assert cid in rows, f"acknowledged {cid} was lost"
        assert rows[cid]["choices"][0]["message"]["content"] == content
    assert fb_acked <= set(store.feedback_ids())
    renderer = Renderer(tok, chat_template=True)
    exported = store.export_streams()
    for s in exported:
        renderer.render(s)
    store.close()
    # restarted, the server continues a conversation acknowledged before a kill
    server = Server(ServeConfig(model="tiny", store=str(store_dir)), env_key=KEY)
    with running(server) as url:
        last = convs[-1]
        raw = client(url).chat.completions.with_raw_response.create(
            model="tiny", messages=[*last, {"role": "user", "content": "after the restart"}], max_tokens=3
        )
        before = {e for e in rows if e in acked}
        assert raw.headers["x-conversation-id"] in {s.meta["conversation"] for s in exported}
        assert before


def test_dtype_auto_follows_the_measured_bf16_rate(tmp_path, monkeypatch, tok):
    """`--dtype auto`: bf16 where a bf16 matmul measures faster, fp32 where it is emulated; a
    forced bf16 on such a CPU warns with the measured rate."""
    import dostream.device as tr

    monkeypatch.setattr(tr.torch.cuda, "is_available", lambda: False)
    for rate, want in ((7.0, "bf16"), (0.006, "fp32")):
        monkeypatch.setattr(tr, "bf16_speedup", lambda device_type, rate=rate: rate)
        server = Server(ServeConfig(model="tiny", store=str(tmp_path / want), dtype="auto"), env_key=KEY, tok=tok)
        model = server.slot.get()[0]
        assert server.dtype == want
        assert next(model.parameters()).dtype == (torch.bfloat16 if want == "bf16" else torch.float32)
    with pytest.warns(UserWarning, match="emulated"):
        Server(ServeConfig(model="tiny", store=str(tmp_path / "forced"), dtype="bf16"), env_key=KEY, tok=tok)
    with pytest.raises(ValueError, match="--dtype"):
        ServeConfig(model="tiny", store=str(tmp_path), dtype="fp16")


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_the_serve_benchmark_interleaves_servers_and_pairs_their_runs(tmp_path):
    """`benchmarks/serve.py --interleave` on the tiny model: both servers (dostream's and `transformers
    serve`; its `--continuous-batching` takes the same path, 18 s slower to warm up) up at once, taking
    turns run by run in alternating order; every run answered; the table gives the paired ratio; the
    JSON names the machine and the settings."""
    from conftest import ROOT

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--model", "tiny", "--clients", "2"]
    cmd += ["--per-client", "2", "--max-tokens", "4", "--repeat", "2", "--interleave"]
    cmd += ["--servers", "dostream,transformers", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    ours, theirs = record["dostream serve"], record["transformers serve"]
    assert [r["requests"] for r in ours + theirs] == [4] * 4 and not any(r["n_errors"] for r in ours + theirs)
    assert all(r["decode"]["steps"] > 0 for r in ours)  # dostream's own account, from its /metrics
    # Round 0: dostream, then transformers; round 1: the other way round.
    order = sorted(
        (r["started_s"], name, r["repeat"])
        for name, rows in record.items()
        if name in ("dostream serve", "transformers serve")
        for r in rows
    )
    assert [(name, i) for _, name, i in order] == [
        ("dostream serve", 0),
        ("transformers serve", 0),
        ("transformers serve", 1),
        ("dostream serve", 1),
    ]
    assert record["settings"]["interleave"] is True and record["environment"]["cpu"]
    assert "| dostream serve's ratio to it | paired ratio |" in proc.stdout


# -- reasoning -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tools", [False, True])
def test_a_thinking_models_reasoning_comes_back_as_reasoning_content_streamed_or_not(tok, tools):
    """A sample that opens with `<think>...</think>`: `reply` returns the block as
    `reasoning_content` and the rest as content; the streamed deltas add up to the same, cut at
    every length (a cut inside the block is all reasoning); a client that sends the message back
    with or without its reasoning continues the same sample (the canonical form ignores it)."""
    from dostream.sampling import Sample
    from dostream.serve.record import StreamedContent, canonical, reply

    ids = tok("<think>\nSmall numbers: 2 and 2.\n</think>\n\nThe answer is 4.", add_special_tokens=False)["input_ids"]
    ids += [tok.eos_token_id]
    for cut in range(1, len(ids) + 1):
        part = ids[:cut]
        finish = "eos" if cut == len(ids) else "length"
        sample = Sample(part, tok.decode(part, skip_special_tokens=False), finish, 0)
        message, _ = reply(sample, tok, (), tools=tools, call_prefix="call_x")
        live = StreamedContent(tok, (), {tok.eos_token_id}, tools=tools)
        got = {"content": "", "reasoning_content": ""}
        for t in part:
            for k, v in live.push(t).items():
                got[k] += v
        for k, v in live.rest(message).items():
            got[k] += v
        assert got == {"content": message["content"] or "", "reasoning_content": message.get("reasoning_content", "")}
    assert message["reasoning_content"] == "Small numbers: 2 and 2." and message["content"] == "The answer is 4."
    without = {k: v for k, v in message.items() if k != "reasoning_content"}
    assert canonical(message) == canonical(without)
