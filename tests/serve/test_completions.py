"""`POST /v1/completions` (the legacy Completions API) against a real server with the official
`openai` client: echo + logprobs scoring equal to `dostream.scoring`, prompts of every shape, n
choices per prompt, seeds, stop strings, what is recorded, and the 400s that name the field."""

from __future__ import annotations

import httpx
import pytest
import torch
from harness import (
    KEY,
    client,
    streams_of,
)

from dostream.scoring import logprobs_at

PROMPT = "The quick brown fox jumps over the lazy dog"


def scored(model, ids: list[int]) -> list[float]:
    """`dostream.scoring` on ids: log p(ids[i] | ids[:i]) for i >= 1."""
    with torch.inference_mode():
        t = torch.tensor([ids])
        return logprobs_at(model, t, torch.ones_like(t), torch.ones_like(t, dtype=torch.bool)).tolist()


def post(served, body: dict) -> httpx.Response:
    return httpx.post(served.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})


def test_echo_scores_the_prompt_as_scoring_does(served, tok):
    c = client(served.url)
    before = served.store.n_exchanges()
    r = c.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    [choice] = r.choices
    lp = choice.logprobs
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert choice.text == PROMPT and "".join(lp.tokens) == PROMPT and len(lp.tokens) == len(ids)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = scored(served.server.slot.get()[0], ids)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-4
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 2 and max(top.values()) >= chosen - 1e-6
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    assert served.store.n_exchanges() == before  # a pure scoring call records nothing


def test_lm_eval_loglikelihood_equals_scoring(served, tok):
    """lm-eval's `local-completions`: context + continuation as one prompt of ids, echo, max_tokens 0,
    logprobs 1; the continuation's log-likelihood is the sum over its tokens."""
    context = tok("Question: what is two plus two?\nAnswer:", add_special_tokens=False)["input_ids"]
    cont = tok(" four", add_special_tokens=False)["input_ids"]
    r = client(served.url).completions.create(
        model="tiny", prompt=[context + cont], echo=True, logprobs=1, max_tokens=0, temperature=0
    )
    lp = r.choices[0].logprobs
    got = sum(lp.token_logprobs[len(context) :])
    want = sum(scored(served.server.slot.get()[0], context + cont)[len(context) - 1 :])
    assert abs(got - want) < 1e-4
    # is_greedy as lm-eval reads it: each continuation token is the top alternative's
    for t, top in zip(lp.tokens[len(context) :], lp.top_logprobs[len(context) :]):
        assert len(top) == 1 and isinstance(t, str)


def test_prompts_n_choices_seed_and_recording(served, tok):
    c = client(served.url)
    r = c.completions.create(model="tiny", prompt=["Hello", "Once upon a time"], n=2, max_tokens=5, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and r.object == "text_completion"
    assert r.id.startswith("cmpl-") and all(ch.finish_reason in ("stop", "length") for ch in r.choices)
    again = c.completions.create(model="tiny", prompt=["Hello", "Once upon a time"], n=2, max_tokens=5, seed=7)
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]
    # each prompt is a conversation of its own: the prompt `context`, each choice an `agent` segment
    for p, prompt in enumerate(["Hello", "Once upon a time"]):
        seq, conv, n = served.store.exchange(f"{r.id}-{p}")
        assert n == 2
        streams = streams_of(served.store, conv)
        assert len(streams) == 2
        for s in streams:
            assert [seg.author for seg in s.segments] == ["context", "agent"]
            assert s.segments[0].text == prompt and s.segments[0].role is None
        texts = sorted(s.segments[1].text for s in streams)
        assert texts == sorted(tok.decode(s.segments[1].token_ids) for s in streams)
        shown = sorted(ch.text for ch in r.choices[2 * p : 2 * p + 2])
        assert all(t.startswith(w) for t, w in zip(texts, shown))


def test_token_id_prompt_and_sampled_logprobs_match_scoring(served, tok):
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    raw = client(served.url).completions.with_raw_response.create(
        model="tiny", prompt=ids, max_tokens=6, logprobs=3, echo=True, seed=1
    )
    r = raw.parse()
    [choice] = r.choices
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and "".join(lp.tokens) == choice.text
    [stream] = streams_of(served.store, raw.headers["x-conversation-id"])
    sampled = stream.segments[1].token_ids
    assert stream.segments[0].meta["prompt_token_ids"] == ids
    n = r.usage.completion_tokens
    assert n == len(sampled) and r.usage.prompt_tokens == len(ids)
    want = scored(served.server.slot.get()[0], ids + sampled)
    got = lp.token_logprobs[1:]
    assert len(got) <= len(want)  # an end-of-turn token drawn is not shown
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


def test_stop_cuts_and_finish_reasons(served):
    c = client(served.url)
    free = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=3, temperature=0)
    text = free.choices[0].text
    assert free.choices[0].finish_reason in ("length", "stop")
    if len(text) < 3:
        pytest.skip("the tiny model wrote too little to cut")
    stop = text[1:3]
    cut = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=3, temperature=0, stop=stop)
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    one = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0)
    assert one.choices[0].finish_reason in ("length", "stop") and one.usage.completion_tokens == 1


def test_streaming_sends_the_text_as_drawn_then_the_finish_and_usage(served):
    """Streamed: the deltas join to the non-streamed text (seeded, the same ids), per choice and
    prompt; a stop string never shows; with echo + logprobs, each choice comes whole."""
    c = client(served.url)
    ask = dict(model="tiny", prompt=[PROMPT, "Once upon a time"], max_tokens=10, seed=4, n=2)
    whole = c.completions.create(**ask)
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **ask))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    for want in whole.choices:
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == want.index]
        assert "".join(m.text for m in mine) == want.text
        assert [m.finish_reason for m in mine if m.finish_reason] == [want.finish_reason] and mine[-1].finish_reason
    if len(whole.choices[0].text) > 3:  # a stop string the model writes
        stop = whole.choices[0].text[2:4]
        cut = list(c.completions.create(stream=True, **{**ask, "prompt": PROMPT, "n": 1, "stop": stop}))
        text = "".join(ch.choices[0].text for ch in cut)
        assert stop not in text and text == whole.choices[0].text[: whole.choices[0].text.find(stop)]
    scored_whole = c.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, seed=1)
    [one] = [
        ch
        for ch in c.completions.create(
            model="tiny", prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, seed=1, stream=True
        )
        if ch.choices
    ]
    assert one.choices[0].text == scored_whole.choices[0].text
    assert one.choices[0].logprobs.token_logprobs == scored_whole.choices[0].logprobs.token_logprobs


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x"}, "model"),
        ({"model": "tiny"}, "prompt"),
        ({"model": "tiny", "prompt": [1, "a"]}, "prompt"),
        ({"model": "tiny", "prompt": [10**9]}, "prompt"),
        ({"model": "tiny", "prompt": ""}, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 65}, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "n": 5}, "n"),
        ({"model": "tiny", "prompt": "x", "logprobs": 6}, "logprobs"),
        ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "tiny", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "tiny", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": "tiny", "prompt": "x", "logit_bias": {"1": 2}}, "logit_bias"),
        ({"model": "tiny", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "tiny", "prompt": "x", "echo": "yes"}, "echo"),
        ({"model": "tiny", "prompt": [[1] * 2040], "max_tokens": 16}, "max_tokens"),
        ({"model": "tiny", "prompt": [[1] * 2049], "max_tokens": 0, "echo": True}, "prompt"),
    ],
)
def test_bad_requests_name_the_field(served, body, param):
    r = post(served, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param)


def test_limits_and_auth(served):
    assert post(served, {"model": "tiny", "prompt": "x" * 70_000}).status_code == 413
    r = httpx.post(served.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401
    r = post(served, {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post(served, {"model": "tiny", "prompt": "x", "max_tokens": 1, "unknown_field": 1})
    assert r.status_code == 200  # unknown fields are ignored
