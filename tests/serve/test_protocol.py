"""Keys and scopes (401/403), bad input as OpenAI errors naming the field, unknown routes."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import run_cli
from harness import (
    KEY,
    TOOLS,
    client,
)


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
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": 2}, 400, "logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    (
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
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
