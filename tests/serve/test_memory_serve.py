"""`dostream serve --memory DIR`: notes retrieved into prompts as `context` (recorded, rendered,
never supervised), the admin endpoints, distillation off the request path."""

from __future__ import annotations

import httpx
import pytest
from harness import KEY, ServeConfig, Server, client, conv_of, decisive_model, running, streams_of

from dostream.memory.store import Cite, Memory
from dostream.render import Renderer
from dostream.serve.protocol import Limits
from dostream.stream import Segment, Stream

AUTH = {"Authorization": f"Bearer {KEY}"}
TAUGHT = Stream(
    "taught-1",
    [
        Segment("user", "Which detail does Skyway Airlines want for a refund?"),
        Segment("agent", "Your passport number.", token_ids=None),
        Segment("user", "No: Skyway Airlines wants the booking reference."),
    ],
)


@pytest.fixture
def remembering(tok, tmp_path):
    mem = Memory.open_dir(tmp_path / "memory")
    note = mem.add("Skyway Airlines wants the booking reference.", "extractive", evidence=[Cite(TAUGHT, 2, (4, 48))])
    mem.close()
    cfg = ServeConfig(
        model="tiny", store=str(tmp_path / "store"), memory=str(tmp_path / "memory"), limits=Limits(max_tokens=16)
    )
    server = Server(cfg, env_key=KEY, model=decisive_model(tok), tok=tok)
    with running(server) as url:
        yield server, url, note


def test_retrieved_notes_enter_the_prompt_as_context_and_are_recorded_exactly(remembering, tok):
    server, url, note = remembering
    c = client(url)
    ask = [{"role": "user", "content": "What does Skyway Airlines want from me?"}]
    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=ask, max_tokens=8, seed=1)
    res, conv = raw.parse(), conv_of(raw)
    [stream] = streams_of(server.store, conv)
    assert [s.author for s in stream.segments] == ["context", "user", "agent"]
    notes = stream.segments[0]
    assert notes.meta["memory_notes"] == [note] and "booking reference" in notes.text
    # the prompt was the recorded stream rendered: the notes are context, masked in every view
    r = Renderer(tok, chat_template=True)
    prompt = r.prompt_ids(Stream(conv, stream.segments[:2]))
    assert res.usage.prompt_tokens == len(prompt)
    rendered = r.render(stream)
    for view in ("interventional", "observational"):
        sup = rendered.supervised(view)
        assert not any(s for s, a in zip(sup, rendered.authors) if a == "context")
    # a message no note matches gets none; the conversation goes on from the recorded stream
    plain = c.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=4
    )
    assert [s.author for s in streams_of(server.store, conv_of(plain))[0].segments] == ["user", "agent"]
    listing = httpx.get(url + "/v1/memory", headers=AUTH).json()
    assert [n["id"] for n in listing["data"]] == [note] and listing["data"][0]["counters"]["used"] == 1
    shown = httpx.get(url + f"/v1/memory/{note}", headers=AUTH).json()
    assert shown["evidence"][0]["author"] == "user" and shown["evidence"][0]["stream"] == "taught-1"
    assert httpx.get(url + "/v1/memory/999", headers=AUTH).status_code == 404
    gone = httpx.delete(url + "/v1/memory", params={"stream": "taught-1"}, headers=AUTH).json()
    assert gone["forgotten"] == [note] and httpx.get(url + "/v1/memory", headers=AUTH).json()["data"] == []
    assert httpx.delete(url + "/v1/memory", headers=AUTH).status_code == 400


def test_distillation_runs_off_the_request_path_and_records_its_point(remembering):
    server, url, _ = remembering
    c = client(url)
    res = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Which gate for Skyway?"}], max_tokens=4
    )
    c.post(
        "/feedback",
        cast_to=object,
        body={"completion_id": res.id, "author": "environment", "text": "Skyway flights leave from gate B."},
    )
    r = httpx.post(url + "/v1/memory/distill", json={"wait": True}, headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["status"] == "done" and r.json()["conversations"] >= 1, r.text
    again = httpx.post(url + "/v1/memory/distill", json={"wait": True}, headers=AUTH, timeout=120).json()
    assert again["status"] == "nothing new"
    assert httpx.post(url + "/v1/memory/distill", json={}, headers=AUTH).status_code == 202


def test_without_memory_the_endpoints_say_so(served):
    r = httpx.get(served.url + "/v1/memory", headers=AUTH)
    assert r.status_code == 409 and "--memory" in r.json()["error"]["message"]
