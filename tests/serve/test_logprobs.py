"""Chat log-probs with the official `openai` client: OpenAI's per-choice shape, streamed chunks that
join to the non-streamed entries, values equal to `dostream.scoring` on the recorded ids, the
record's `meta.logprobs`, and 400s naming the field."""

from __future__ import annotations

import openai
import pytest
from conftest import scored_after
from harness import (
    client,
    conv_of,
    streams_of,
)

from dostream.render import Renderer, decode
from dostream.stream import Stream

ASK = dict(
    model="tiny",
    messages=[{"role": "user", "content": "Tell me a story"}],
    max_tokens=12,
    n=2,
    seed=2,
    temperature=1.0,
    stop=["e ", "the"],
    logprobs=True,
    top_logprobs=2,
)


def _plain(entries) -> list[dict]:
    return [e.model_dump() for e in entries]


def test_logprobs_match_scoring_on_the_recorded_ids_and_stream_the_same(served, tok):
    c = client(served.url)
    raw = c.chat.completions.with_raw_response.create(**ASK)
    whole, conv = raw.parse(), conv_of(raw)
    model = served.server.slot.get()[0]
    renderer = Renderer(tok, chat_template=True)
    recorded = {}
    for stream in streams_of(served.store, conv):
        *before, agent = stream.segments
        recorded[tuple(agent.token_ids)] = (renderer.prompt_ids(Stream(conv, before)), agent)
    assert len(recorded) == 2
    assert {ch.finish_reason for ch in whole.choices} == {"stop", "length"}  # an end-of-turn or stop cut, and none
    for choice in whole.choices:
        entries = choice.logprobs.content
        ids = next(i for i in recorded if [decode(tok, [t]) for t in i] == [e.token for e in entries])
        prompt, agent = recorded[ids]
        # an entry per sampled token (as vLLM: the end-of-turn token and a stop string's included)
        assert len(entries) == len(ids)
        joined = b"".join(bytes(e.bytes) for e in entries)
        assert joined.decode("utf-8", errors="replace") == decode(tok, list(ids))
        assert "".join(e.token for e in entries) == "".join(decode(tok, [i]) for i in ids)
        assert decode(tok, list(ids)).startswith(choice.message.content)
        if choice.finish_reason == "stop":  # the cut tokens (end-of-turn or stop string) have entries too
            assert decode(tok, list(ids)) != choice.message.content
        want = scored_after(model, prompt, list(ids))
        assert [e.logprob for e in entries] == pytest.approx(want, abs=1e-4)
        assert agent.meta["logprobs"] == pytest.approx(want, abs=1e-4)  # the record keeps them, raw
        assert agent.meta["sampled_with"] == {"temperature": 1.0, "top_p": 1.0}
        for e in entries:
            top = [t.logprob for t in e.top_logprobs]
            assert len(top) == 2 and top == sorted(top, reverse=True) and e.logprob <= top[0] + 1e-6
    # streamed: the chunks' entries, joined per choice, are the non-streamed response's
    parts, text = [[], []], ["", ""]
    for ch in c.chat.completions.create(stream=True, **ASK):
        for choice in ch.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.logprobs is not None:
                parts[choice.index] += _plain(choice.logprobs.content)
    for choice, got, content in zip(whole.choices, parts, text):
        want = _plain(choice.logprobs.content)
        assert content == choice.message.content
        assert [(e["token"], e["bytes"]) for e in got] == [(e["token"], e["bytes"]) for e in want]
        assert [e["logprob"] for e in got] == pytest.approx([e["logprob"] for e in want], abs=1e-5)


def test_without_logprobs_nothing_is_returned_or_recorded(served):
    c = client(served.url)
    ask = {**ASK, "n": 1, "logprobs": None, "top_logprobs": None}
    ask = {k: v for k, v in ask.items() if v is not None}
    raw = c.chat.completions.with_raw_response.create(**ask)
    assert raw.parse().choices[0].logprobs is None
    [stream] = streams_of(served.store, conv_of(raw))
    assert "logprobs" not in stream.segments[-1].meta
    assert all(ch.choices[0].logprobs is None for ch in c.chat.completions.create(stream=True, **ask) if ch.choices)
    # logprobs alone: the drawn tokens' log-probs, no alternatives
    only = c.chat.completions.create(**{**ask, "logprobs": True})
    assert only.choices[0].logprobs.content and all(e.top_logprobs == [] for e in only.choices[0].logprobs.content)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 1.5}, "top_logprobs"),
    ],
)
def test_bad_logprobs_are_400_naming_the_field(served, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(served.url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2, **extra
        )
    assert e.value.body["param"] == param and e.value.body["message"].startswith(param)
