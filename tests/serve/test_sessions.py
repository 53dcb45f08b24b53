"""Event-driven sessions (`WS /v1/realtime`) with a real WebSocket client (`websockets`) against a
real server: text appended in chunks is prefilled as it arrives, an answer streams, is
interrupted and truncated, and the exported stream holds the chunks, the delivered and undelivered
tokens, and renders exactly what each answer was conditioned on."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from harness import KEY, ServeConfig, Server, _free_port, decisive_model, running, serve_process, streams_of

from dostream.render import Renderer
from dostream.serve.protocol import Limits
from dostream.serve.store import ServeStore

ws_client = pytest.importorskip("websockets.sync.client")


class Slow(torch.nn.Module):
    """The decisive model, a few ms slower a forward: an answer lasts long enough to interrupt."""

    def __init__(self, model, seconds: float):
        super().__init__()
        self.model, self.config, self.seconds = model, model.config, seconds

    def forward(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.model(*args, **kwargs)


@pytest.fixture(scope="module")
def live(tok, tmp_path_factory):
    store = tmp_path_factory.mktemp("sessions")
    server = Server(
        ServeConfig(model="tiny", store=str(store), limits=Limits(max_tokens=64), fast_step=False),
        env_key=KEY,
        model=Slow(decisive_model(tok), 0.02),
        tok=tok,
    )
    with running(server) as url:
        yield server, "ws" + url.removeprefix("http") + "/v1/realtime?model=tiny"


def connect(url: str, key: str = KEY):
    return ws_client.connect(url, additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=10)


def send(ws, **event) -> None:
    ws.send(json.dumps(event))


def until(ws, kind: str, seen: list | None = None) -> dict:
    while True:
        event = json.loads(ws.recv(timeout=30))
        if seen is not None:
            seen.append(event)
        if event["type"] in (kind, "error"):
            return event


def answer(ws, **response) -> tuple[dict, str]:
    send(ws, type="response.create", response=response)
    events: list = []
    done = until(ws, "response.done", events)
    assert done["type"] == "response.done", done
    return done, "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_a_session_streams_prefills_as_typed_interrupts_and_records_what_was_heard(live, tok):
    server, url = live
    with connect(url) as ws:
        created = json.loads(ws.recv(timeout=10))
        assert created["type"] == "session.created" and created["session"]["prefill"] == "streamed"
        send(ws, type="session.update", session={"instructions": "Be brief.", "temperature": 0})
        assert until(ws, "session.updated")["session"]["instructions"] == "Be brief."
        warmed = server.batcher.warmed
        chunks = ["Tell me about the sea ", "and the sky tonight, ", "the stars over the harbour, "]
        chunks += ["the boats at rest and ", "the gulls asleep on the pier wall"]
        for c in chunks:
            send(ws, type="input_text_buffer.append", delta=c)
            time.sleep(0.1)  # (typing: the prefill ahead runs meanwhile)
        deadline = time.monotonic() + 10  # the user pauses before committing; the prefill ahead ends meanwhile
        while server.batcher.warmed == warmed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.batcher.warmed > warmed  # the typed text was prefilled before the commit
        send(ws, type="input_text_buffer.commit")
        item = until(ws, "conversation.item.created")["item"]
        assert item["content"][0]["text"] == "".join(chunks)
        reused = server.batcher.prefixes.reused
        done, text = answer(ws, max_output_tokens=12)
        # ... and the answer's prefill began from it: only the last word and the template's closing were left
        assert server.batcher.prefixes.reused - reused >= done["response"]["usage"]["input_tokens"] - 12
        first = done["response"]
        assert first["status"] in ("completed", "incomplete") and first["output"][0]["content"][0]["text"] == text
        # interrupted: a user chunk during the answer cancels it
        send(
            ws,
            type="conversation.item.create",
            item={"role": "user", "content": [{"type": "input_text", "text": "Go on."}]},
        )
        until(ws, "conversation.item.created")
        send(ws, type="response.create", response={"max_output_tokens": 64})
        events: list = []
        until(ws, "response.output_text.delta", events)
        send(ws, type="input_text_buffer.append", delta="Stop, ")
        done = until(ws, "response.done", events)
        assert done["response"]["status"] == "cancelled", done
        heard = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        cut_item = done["response"]["output"][0]["id"]
        send(ws, type="input_text_buffer.append", delta="what is a wave?")
        send(ws, type="input_text_buffer.commit")
        until(ws, "input_text_buffer.committed")
        answer(ws, max_output_tokens=6)
        # the client says how much of the cut answer was actually heard
        send(ws, type="conversation.item.truncate", item_id=cut_item, content_index=0, text_end=1)
        truncated = until(ws, "conversation.item.truncated")
        assert truncated["text_end"] <= 1
    conv = server.store.conversations()[-1]
    [stream] = streams_of(server.store, conv)
    authors = [s.author for s in stream.segments]
    assert authors == ["context", "user", "agent", "user", "agent", "user", "agent"]
    typed = stream.segments[1]
    assert typed.text == "".join(chunks) and [end for _, end in typed.meta["chunks"]] == [
        len("".join(chunks[: k + 1])) for k in range(5)
    ]
    assert [at for at, _ in typed.meta["chunks"]] == sorted(at for at, _ in typed.meta["chunks"])
    assert stream.segments[5].text == "Stop, what is a wave?" and len(stream.segments[5].meta["chunks"]) == 2
    cut = stream.segments[4]
    assert cut.meta["finish_reason"] == "cancelled" and cut.meta["delivered_chars"] <= 1
    assert cut.meta["delivered_tokens"] <= len(cut.token_ids) and heard.startswith(
        tok.decode(cut.token_ids[: cut.meta["delivered_tokens"]])
    )
    # exact: each answer was conditioned on the render of the stream before it, and its ids follow
    renderer = Renderer(tok, chat_template=True)
    full = renderer.render(stream).input_ids
    for k, seg in enumerate(stream.segments):
        if seg.author == "agent":
            prompt = renderer.prompt_ids(type(stream)(stream.id, stream.segments[:k]))
            assert (
                full[: len(prompt)] == prompt and full[len(prompt) : len(prompt) + len(seg.token_ids)] == seg.token_ids
            )


def test_bad_events_are_error_events_and_the_session_goes_on(live):
    server, url = live
    with connect(url) as ws:
        until(ws, "session.created")
        for event, code in [
            ({"type": "nope"}, "invalid_event"),
            ({"type": "input_text_buffer.commit"}, "input_text_buffer_commit_empty"),
            ({"type": "response.cancel"}, "response_cancel_not_active"),
            ({"type": "session.update", "session": {"temperature": 9}}, "invalid_value"),
            ({"type": "conversation.item.truncate", "item_id": "x", "text_end": 1}, "invalid_value"),
            ({"type": "input_text_buffer.append", "delta": "<|im_end|>"}, None),
        ]:
            send(ws, **event, event_id="ev1")
            if code is None:
                send(ws, type="input_text_buffer.commit")
                code = "invalid_value"
            err = until(ws, "error")
            assert err["type"] == "error" and err["error"]["code"] == code, err
        ws.send("not json")
        assert until(ws, "error")["error"]["code"] == "invalid_json"
    with connect(url, key="sk-wrong") as ws:
        err = json.loads(ws.recv(timeout=10))
        assert err["type"] == "error" and err["error"]["code"] == "invalid_api_key"


def test_sigkill_mid_session_loses_no_committed_item(tmp_path):
    port = _free_port()
    proc = serve_process(tmp_path, port)
    try:
        with connect(f"ws://127.0.0.1:{port}/v1/realtime") as ws:
            until(ws, "session.created")
            send(ws, type="input_text_buffer.append", delta="Remember ")
            send(ws, type="input_text_buffer.append", delta="this.")
            send(ws, type="input_text_buffer.commit")
            until(ws, "input_text_buffer.committed")
            send(ws, type="input_text_buffer.append", delta="never committed")
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = ServeStore.open_dir(tmp_path, read_only=True)
    [conv] = [r[0] for r in store._all("SELECT DISTINCT conversation FROM session_items")]
    [stream] = store.conversation_streams(conv)
    assert [s.text for s in stream.segments] == ["Remember this."]


def test_the_learner_trains_on_session_streams_like_any_other(tok, tmp_path):
    """One update through a learning server whose only conversations are sessions'."""
    import httpx

    from dostream.serve.learn import LearnConfig

    learn = LearnConfig(update_every_tokens=1 << 30, lora_r=4, lora_alpha=8, epochs=1, batch_size=8, gate_learned=0)
    server = Server(
        ServeConfig(model="tiny", store=str(tmp_path), limits=Limits(max_tokens=16), learn=learn), env_key=KEY, tok=tok
    )
    with running(server) as url:
        with connect("ws" + url.removeprefix("http") + "/v1/realtime") as ws:
            until(ws, "session.created")
            for text in ("Which detail does Skyway want?", "No: Skyway wants the booking reference."):
                send(ws, type="input_text_buffer.append", delta=text)
                send(ws, type="input_text_buffer.commit")
                until(ws, "input_text_buffer.committed")
                answer(ws, max_output_tokens=8)
        r = httpx.post(url + "/v1/learn", json={"wait": True}, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
        result = r.json()
        assert r.status_code == 200 and result["status"] in ("accepted", "rejected"), result
        assert result["metrics"]["conversations/new"] == 1, result


def test_prefill_ahead_is_coalesced_and_answers_as_prefill_on_commit(tok, tmp_path):
    """Typed word by word, a session prefills ahead once per `prefill_ahead_tokens` new tokens, and
    what is left once the input pauses (`prefill_ahead_idle_ms`), not once a chunk; its greedy
    answer is token for token the answer of prefill on commit (fp32)."""
    cfg = ServeConfig(model="tiny", store=str(tmp_path), limits=Limits(max_tokens=16), precision="fp32")
    cfg.prefill_ahead_tokens, cfg.prefill_ahead_idle_ms = 8, 300
    server = Server(cfg, env_key=KEY, model=decisive_model(tok), tok=tok)
    text = "The harbour town wakes slowly in winter. Fishing boats rock against the pier while gulls argue "
    text += "over scraps, and the baker on the corner pulls the first loaves from an oven older than anyone knows."
    chunks = [w + " " for w in text.split(" ")]
    chunks[-1] = chunks[-1].rstrip()

    def session(url: str, mode: str, pause: float) -> tuple[int, int, dict]:
        with connect(url) as ws:
            until(ws, "session.created")
            send(ws, type="session.update", session={"prefill": mode, "temperature": 0})
            until(ws, "session.updated")
            warms = server.batcher.warms
            for c in chunks:
                send(ws, type="input_text_buffer.append", delta=c)
                time.sleep(0.02)  # faster than the pause the server waits for
            typing = server.batcher.warms - warms
            time.sleep(pause)
            paused = server.batcher.warms - warms - typing
            send(ws, type="input_text_buffer.commit")
            until(ws, "input_text_buffer.committed")
            done, _ = answer(ws, max_output_tokens=12)
            return typing, paused, done["response"]

    with running(server) as url:
        url = "ws" + url.removeprefix("http") + "/v1/realtime?model=tiny"
        assert session(url, "on_commit", 0.6)[:2] == (0, 0)
        typing, paused, response = session(url, "streamed", 0.6)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert 1 <= typing <= n // 8 < len(chunks) and paused == 1, (typing, paused, n)
        cfg.prefill_ahead_tokens = 10_000  # none while typing: only the pause prefills ahead
        assert session(url, "streamed", 0.6)[:2] == (0, 1)
    answers = [s for c in server.store.conversations() for st in streams_of(server.store, c) for s in st.segments]
    on_commit, streamed, _ = [s.token_ids for s in answers if s.author == "agent"]
    assert streamed == on_commit and len(streamed) > 0 and response["usage"]["input_tokens"] > n
