"""Tenants on one server (tiny model, 127.0.0.1, the official `openai` client and raw httpx): tenant
A's key cannot list, read, continue, send feedback on, learn from or roll back tenant B's
conversations or adapter, each refusal OpenAI's error shape with nothing of B's in it; an admin
key acts for any tenant; a tenant's system context and its snapshot rollback; a tenant's slice is
all its learner reads; `dostream forget` leaves no byte of the forgotten stream in the store file."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import openai
import pytest
from harness import KEY, client, conv_of, decisive_model, running

from dostream.serve.app import ServeConfig, Server
from dostream.serve.protocol import Limits
from dostream.serve.store import Exchange, ServeStore
from dostream.stream import Segment

ASK = dict(model="tiny", max_tokens=4, temperature=0)
B_SECRET = "Bravo's vault code is 4417"


@pytest.fixture(scope="module")
def tenancy(tok, tmp_path_factory):
    store = tmp_path_factory.mktemp("tenants")
    server = Server(
        ServeConfig(model="tiny", store=str(store), limits=Limits(max_body=64_000, max_tokens=16, max_n=2)),
        env_key=KEY,
        model=decisive_model(tok),
        tok=tok,
    )
    keys = {}
    for name, tenant, scopes in [("a", "alpha", ("chat", "feedback")), ("a_admin", "alpha", ("admin",))]:
        keys[name] = server.store.add_key(name, scopes, tenant)[1]
    keys["b"] = server.store.add_key("b", ("chat", "feedback"), "bravo")[1]
    with running(server) as url:
        b = client(url, keys["b"]).chat.completions.with_raw_response.create(
            messages=[{"role": "user", "content": B_SECRET}], user="bravo-user", **ASK
        )
        yield SimpleNamespace(url=url, server=server, store=server.store, dir=store, keys=keys, b=b)


def _raw(t, method: str, path: str, key: str, **kw) -> httpx.Response:
    return httpx.request(
        method, t.url + path, headers={"Authorization": f"Bearer {key}", **kw.pop("headers", {})}, **kw
    )


def _refused(r: httpx.Response, t, status: int) -> None:
    """An OpenAI-shaped refusal with nothing of bravo's in it."""
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    b_conv, b_id = conv_of(t.b), t.b.parse().id
    for leak in (b_conv, b_id, "4417", "bravo"):
        assert leak not in r.text, (leak, r.text)


def test_a_key_sees_only_its_own_conversations(tenancy):
    t = tenancy
    a = client(t.url, t.keys["a"]).chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": "Alpha here"}], **ASK
    )
    a_conv, b_conv = conv_of(a), conv_of(t.b)
    assert t.store.tenant_of(a_conv) == "alpha" and t.store.tenant_of(b_conv) == "bravo"
    listed = _raw(t, "GET", "/v1/conversations", t.keys["a"]).json()["data"]
    assert [c["id"] for c in listed] == [a_conv]  # (checked before the conversations below)
    own = _raw(t, "GET", f"/v1/conversations/{a_conv}", t.keys["a"]).json()
    assert own["streams"][0]["segments"][0]["text"] == "Alpha here"
    _refused(_raw(t, "GET", f"/v1/conversations/{b_conv}", t.keys["a"]), t, 404)
    # resending B's whole history (its assistant reply too) starts a new conversation of A's
    b_reply = t.b.parse().choices[0].message.content
    history = [{"role": "user", "content": B_SECRET}, {"role": "assistant", "content": b_reply}]
    again = client(t.url, t.keys["a"]).chat.completions.with_raw_response.create(
        messages=[*history, {"role": "user", "content": "and?"}], **ASK
    )
    assert conv_of(again) != b_conv and t.store.tenant_of(conv_of(again)) == "alpha"
    # the same `user` (a conversation id) in two tenants: two conversations, no 404 to probe with
    same = client(t.url, t.keys["a"]).chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": "me too"}], user="bravo-user", **ASK
    )
    assert conv_of(same) == "alpha:bravo-user" and t.store.tenant_of(conv_of(t.b)) == "bravo"
    # the admin key reads everyone's, and chats for a tenant it names
    everyone = _raw(t, "GET", "/v1/conversations", KEY, headers={"X-Tenant": "bravo"}).json()["data"]
    assert [c["id"] for c in everyone] == [b_conv]
    r = client(t.url).chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": "for bravo"}], extra_headers={"X-Tenant": "bravo"}, **ASK
    )
    assert t.store.tenant_of(conv_of(r)) == "bravo"
    # naming B's conversation id reaches a conversation of A's own (ids are per tenant), B's untouched
    b_other = conv_of(r)
    n = len(t.store.conversation_streams(b_other)[0].segments)
    mine = client(t.url, t.keys["a"]).chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": "more"}], extra_headers={"X-Conversation-Id": b_other}, **ASK
    )
    assert conv_of(mine) == f"alpha:{b_other}" and len(t.store.conversation_streams(b_other)[0].segments) == n


def test_a_key_cannot_send_feedback_learn_or_roll_back_for_b(tenancy):
    t = tenancy
    b_id, b_conv = t.b.parse().id, conv_of(t.b)
    a = client(t.url, t.keys["a"])
    for body in (
        {"completion_id": b_id, "reward": 1.0, "author": "user"},
        {"conversation_id": b_conv, "text": "x", "author": "user"},
    ):
        with pytest.raises(openai.NotFoundError) as e:
            a.post("/feedback", cast_to=object, body=body)
        assert b_id not in str(e.value.body) and b_conv not in str(e.value.body)
    _refused(
        _raw(t, "POST", "/v1/feedback", t.keys["a"], json={"completion_id": b_id, "reward": 1.0, "author": "user"}),
        t,
        404,
    )
    assert t.store.feedback_ids() == []
    admin = t.keys["a_admin"]
    for method, path in [
        ("POST", "/v1/tenants/bravo/rollback"),
        ("POST", "/v1/tenants/bravo"),
        ("GET", "/v1/tenants/bravo"),
    ]:
        _refused(_raw(t, method, path, admin, json={"context": "x"}), t, 403)
    for path in ("/v1/learn", "/v1/adapters/rollback", "/v1/adapters"):
        _refused(
            _raw(t, "POST" if "learn" in path or "roll" in path else "GET", path, admin, headers={"X-Tenant": "bravo"}),
            t,
            403,
        )
    # its own: the learner and versions of alpha (this server does not learn: 409 names no tenant)
    assert _raw(t, "POST", "/v1/learn", admin, json={}).status_code == 409
    assert _raw(t, "GET", "/v1/adapters", t.keys["a"]).json()["current"]["version"] == 0
    listed = _raw(t, "GET", "/v1/tenants", admin).json()["data"]
    assert [x["id"] for x in listed] == ["alpha"] and "bravo" not in str(listed)
    assert [x["id"] for x in _raw(t, "GET", "/v1/tenants", KEY).json()["data"]] == ["default", "alpha", "bravo"]
    # a chat-only key of alpha: its scope first (403 insufficient_scope)
    assert _raw(t, "POST", "/v1/learn", t.keys["a"]).json()["error"]["code"] == "insufficient_scope"


def test_context_opens_new_conversations_and_rolls_back_with_the_snapshot(tenancy):
    t = tenancy
    admin = t.keys["a_admin"]
    snap = _raw(t, "POST", "/v1/tenants/alpha", admin, json={"context": "You serve Alpha Corp."}).json()
    assert snap["context"] == "You serve Alpha Corp." and snap["version"] == 0
    r = client(t.url, t.keys["a"]).chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": "hi"}], **ASK
    )
    first = t.store.conversation_streams(conv_of(r))[0].segments[0]
    assert (first.author, first.text, first.role) == ("context", "You serve Alpha Corp.", "system")
    b = client(t.url, t.keys["b"]).chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": "hi"}], **ASK
    )
    assert t.store.conversation_streams(conv_of(b))[0].segments[0].author == "user"
    back = _raw(t, "POST", "/v1/tenants/alpha/rollback", admin, json={}).json()
    assert back["context"] == "" and back["reason"] == f"rollback to snapshot {snap['id'] - 1}"
    shown = _raw(t, "GET", "/v1/tenants/alpha", admin).json()
    assert shown["context"] == "" and [s["reason"] for s in shown["snapshots"]][-1].startswith("rollback")
    _refused(_raw(t, "POST", "/v1/tenants/alpha/rollback", admin, json={"snapshot": 999}), t, 404)


def test_a_slice_is_all_a_learner_reads(tmp_path):
    store = ServeStore(tmp_path / "s.sqlite")
    for i, tenant in enumerate(["alpha", "bravo", "alpha", "default"]):
        store.add_exchanges(
            [
                Exchange(
                    f"c-{i}",
                    f"conv-{i}",
                    None,
                    None,
                    [Segment("user", f"m{i}")],
                    [Segment("agent", "ok", token_ids=[1])],
                    {},
                    None,
                    None,
                    [f"k{i}"],
                    tenant,
                )
            ]
        )
    alpha = store.slice("alpha")
    assert alpha.conversations() == ["conv-0", "conv-2"] and alpha.latest_seqs() == (2, -1)
    assert alpha.conversations_since((0, -1)) == (["conv-2"], ["conv-0"])
    assert alpha.conversation_streams("conv-1") == [] and alpha.find_continuation(["k1"]) is None
    assert store.slice("default").conversations() == ["conv-3"] and store.conversations() == [
        f"conv-{i}" for i in range(4)
    ]
    assert alpha.conversations_since((-1, -1), until=(0, -1)) == (["conv-0"], [])
    with pytest.raises(ValueError, match="tenant: expected"):
        store.add_key("x", ("chat",), "../etc")


def test_forget_user_leaves_no_byte_in_the_store_file(tenancy, tmp_path, capsys):
    """`dostream forget --user`: bravo-user's streams gone from serve.sqlite and its WAL (after the
    checkpoint), the record holds only a hash of the id; nothing of alpha's touched."""
    import json
    import shutil

    from dostream.cli.forget import cli_main

    t = tenancy
    canary = "ZQX-canary-9931"
    r = client(t.url, t.keys["b"]).chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": f"Remember {canary}"}], user="bravo-user", **ASK
    )
    client(t.url, t.keys["b"]).post(
        "/feedback", cast_to=object, body={"completion_id": r.parse().id, "author": "user", "text": f"{canary}!"}
    )
    copy = tmp_path / "store"
    t.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copytree(t.dir, copy)
    before = ServeStore.open_dir(copy)
    alpha = before.conversations("alpha")
    before.close()
    assert canary.encode() in (copy / "serve.sqlite").read_bytes()
    assert cli_main(["--store", str(copy), "--user", "bravo-user", "--tenant", "bravo", "--key", "key-test"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == "done" and record["api_key"] == "key-test" and record["tenant"] == "bravo"
    assert "bravo-user" not in json.dumps(record) and record["record"]["counts"]["conversations"] == 1
    assert record["record"]["counts"] == {
        "conversations": 1,
        "exchanges": 2,
        "feedback": 1,
    }  # `user` names the conversation
    assert record["record"]["checkpoint"] == "complete"
    for f in copy.glob("serve.sqlite*"):
        data = f.read_bytes()
        for gone in (canary, conv_of(r), r.parse().id, conv_of(t.b)):
            assert gone.encode() not in data, (gone, f)
    after = ServeStore.open_dir(copy, read_only=True)
    assert after.conversations("alpha") == alpha and conv_of(t.b) not in after.conversations()
    after.close()


def test_responses_and_completions_stay_in_the_keys_tenant(tenancy):
    """`previous_response_id` of another tenant's response reads nothing of it; a legacy
    completion is recorded in the key's tenant's slice."""
    t = tenancy
    b_resp = client(t.url, t.keys["b"]).responses.create(model="tiny", input=B_SECRET, max_output_tokens=4)
    with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as e:
        client(t.url, t.keys["a"]).responses.create(
            model="tiny", input="what did I say?", previous_response_id=b_resp.id, max_output_tokens=4
        )
    assert "4417" not in str(e.value.body) and "bravo" not in str(e.value.body)
    done = client(t.url, t.keys["a"]).completions.create(model="tiny", prompt="Alpha's raw prompt", max_tokens=2)
    assert t.store.tenant_of(t.store.exchange(done.id)[1]) == "alpha"
