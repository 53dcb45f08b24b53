"""The OpenAI chat surface against a real server on 127.0.0.1 with the official `openai` client:
models, chat, seeds, streaming, n choices, named conversations and feedback, reasoning."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from harness import (
    KEY,
    client,
    conv_of,
    streams_of,
)

from dostream.render import Renderer
from dostream.stream import Stream


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
    assert all(ch.usage is None for ch in chunks) and chunks[-1].choices  # no usage chunk unless asked
    # stream_options.include_usage: a last chunk with no choices and the usage; `usage: null` before it
    counted = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in counted[:-1])
    for extra, param in [
        (dict(stream_options={"include_usage": True}), "stream_options"),  # only with stream: true
        (dict(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**ask, **extra)
        assert e.value.body["param"] == param
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
