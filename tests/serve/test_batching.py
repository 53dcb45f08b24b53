"""Streaming as tokens are drawn, continuous batching (rows join and leave), 32 clients at once,
batch-mate independence, bf16 serving."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import openai
import pytest
import torch
from harness import (
    KEY,
    Scripted,
    client,
    decisive_model,
    running,
)

from dostream.render import Renderer
from dostream.sampling import SamplingConfig, sample
from dostream.serve.app import ServeConfig, Server
from dostream.stream import Stream


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
    direct = sample(
        served.server.slot.get()[0], tok, [prompt] * 2, SamplingConfig(max_new_tokens=12, seed=1234, precision="fp32")
    )
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
