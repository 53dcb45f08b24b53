"""Tenants served in the one engine's mixed batch (issue 35 item 3), through real HTTP with the
official `openai` client: rows of tenants with different adapters decode together, each drawing
what its adapter alone draws (greedy, fp32), each exchange recording the adapter its rows used; a
tenant with no adapter gets the base model beside a default tenant whose slot holds a merged
adapter; a new version of one tenant mid-decode leaves its running rows on theirs."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
from harness import KEY, client, conv_of, random_lora, running

from dostream.memory.store import Cite, Memory
from dostream.models import load_model
from dostream.render import Renderer
from dostream.sampling import SamplingConfig, sample
from dostream.serve.app import ServeConfig, Server
from dostream.serve.protocol import Limits
from dostream.serve.store import ServeStore
from dostream.serve.tenants import lineage_of
from dostream.stream import Segment, Stream

PROMPTS = ["What is 2+2?", "Name a colour.", "Hi there, how", "Tell me a story"]
TENANTS = ("alpha", "bravo", "plain")  # plain: no adapter of its own, the base model
ALPHA_FACT = "The harbour vault opens with code 7731."
DEFAULT_FACT = "The harbour vault opens with code 5150."


def install(lineage, step: int, model) -> str:
    """Record `model`'s adapter as `lineage`'s accepted update `step` (what an accepted update's
    record does: in force from this transaction on); returns its key."""
    where = lineage.dir_of(step) / "adapter"
    model.save_pretrained(where)
    key = str(where.relative_to(lineage.root))
    lineage.versions.add("update", key, True, "installed", {}, {}, {"exchanges": -1, "feedback": -1, "n": step})
    return key


@pytest.fixture(scope="module")
def fleet(tok, tmp_path_factory):
    """A store where the default tenant has an accepted update (its slot holds it merged), alpha
    two (the second in force), bravo one, plain none; a key for each tenant."""
    root = tmp_path_factory.mktemp("fleet")
    store_dir, refs = root / "store", {}
    base = load_model("tiny").eval()
    refs["plain"] = base
    store = ServeStore.open_dir(store_dir)
    keys = {t: store.add_key(t, ("chat", "feedback"), t)[1] for t in TENANTS}
    made = {"default": random_lora(base, 1, root / "d"), "alpha1": random_lora(base, 2, root / "a1")}
    made.update(alpha=random_lora(base, 3, root / "a2"), bravo=random_lora(base, 4, root / "b"))
    lineages = {t: lineage_of(store_dir, t, None, store.versions) for t in ("default", "alpha", "bravo")}
    installed = {"default": install(lineages["default"], 1, made["default"])}
    installed["alpha1"] = install(lineages["alpha"], 1, made["alpha1"])
    installed["alpha"] = install(lineages["alpha"], 2, made["alpha"])
    installed["bravo"] = install(lineages["bravo"], 1, made["bravo"])
    store.close()
    refs.update(made)
    memory = root / "memory"  # the default tenant's notes, and alpha's (MEMORY/tenants/alpha); bravo none
    for directory, fact in ((memory, DEFAULT_FACT), (memory / "tenants" / "alpha", ALPHA_FACT)):
        mem = Memory.open_dir(directory)
        told = Stream("told", [Segment("user", fact, role="user")])
        mem.add(fact, "extractive", evidence=[Cite(told, 0)])
        mem.close()
    server = Server(
        ServeConfig(
            model="tiny", store=str(store_dir), precision="fp32", gather_ms=2000, max_batch_rows=6,
            limits=Limits(max_tokens=64, max_n=2), memory=str(memory),
        ),
        env_key=KEY,
        tok=tok,
    )  # fmt: skip
    assert server.slot.get()[1] == installed["default"]  # the default tenant's update, merged
    with running(server) as url:
        yield SimpleNamespace(url=url, server=server, keys=keys, refs=refs, installed=installed)


def _alone(model, tok, stream: Stream, n: int) -> list[int]:
    """What `model` alone draws greedily for the recorded prompt of `stream`'s last agent turn."""
    prompt = Renderer(tok, chat_template=True).prompt_ids(Stream(stream.id, stream.segments[:-1]))
    return sample(model, tok, [prompt], SamplingConfig(greedy=True, max_new_tokens=n, precision="fp32"))[0].token_ids


def _ask(url: str, key: str, text: str, n: int = 8, **kw):
    return client(url, key).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": text}], max_tokens=n, temperature=0, **kw
    )


def _recorded(server, raw) -> tuple[str | None, list[int], Stream]:
    stream = server.store.conversation_streams(conv_of(raw))[0]
    return stream.meta["adapters"][-1], stream.segments[-1].token_ids, stream


def test_tenants_decode_together_each_as_its_adapter_alone(fleet, tok):
    """Six requests of three tenants (two adapters and the base) at once: one decode, and each
    answer is its tenant's adapter's alone; the default tenant (merged adapter) then answers with
    its own; each exchange records the adapter its rows used."""
    f = fleet
    batches = f.server.engine.batches
    plan = [(t, PROMPTS[i % 4]) for i, t in enumerate([*TENANTS, *TENANTS])]
    with ThreadPoolExecutor(len(plan)) as pool:
        answers = list(pool.map(lambda p: _ask(f.url, f.keys[p[0]], p[1]), plan))
    assert f.server.engine.batches == batches + 1  # the six rows in one decode (max_batch_rows=6 ends the gather)
    default = _ask(f.url, KEY, PROMPTS[0])
    seen = {}
    for (tenant, _), raw in [*zip(plan, answers), (("default", None), default)]:
        adapter, ids, stream = _recorded(f.server, raw)
        assert adapter == f.installed.get(tenant), tenant  # plain: None, the base
        assert ids == _alone(f.refs[tenant], tok, stream, 8), tenant
        seen.setdefault(stream.segments[-2].text, {})[tenant] = ids
    assert any(len({tuple(v) for v in by.values()}) == len(by) > 1 for by in seen.values())  # adapters differ
    assert answers[0].parse().choices[0].message.content is not None


def test_a_new_version_of_one_tenant_mid_decode(fleet, tok):
    """Alpha's next version recorded while alpha's and bravo's rows decode: the running rows finish
    on the version they started with, a request after it decodes on the new one beside them."""
    f = fleet
    started = threading.Event()
    results = {}

    def long(name: str, tenant: str) -> None:
        stream = client(f.url, f.keys[tenant]).chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=64, temperature=0, stream=True
        )
        for _ in stream.parse():
            started.set()
        results[name] = stream

    threads = [threading.Thread(target=long, args=(n, t)) for n, t in (("old", "alpha"), ("other", "bravo"))]
    for th in threads:
        th.start()
    assert started.wait(60)
    lineage = f.server.tenants.get("alpha").lineage
    new_key = install(lineage, 3, f.refs["alpha1"])  # version 3: alpha's first adapter's weights, a new key
    new = _ask(f.url, f.keys["alpha"], PROMPTS[1])
    for th in threads:
        th.join(60)
    try:
        old_adapter, old_ids, old_stream = _recorded(f.server, results["old"])
        assert old_adapter == f.installed["alpha"]
        assert old_ids == _alone(f.refs["alpha"], tok, old_stream, 64)
        adapter, ids, stream = _recorded(f.server, new)
        assert adapter == new_key and ids == _alone(f.refs["alpha1"], tok, stream, 8)
        record = f.server.store.conversation_streams(conv_of(new))[0]
        assert record.meta["adapters"] == [new_key]
        assert _recorded(f.server, results["other"])[0] == f.installed["bravo"]
        (request,) = f.server.store._one("SELECT request FROM exchanges WHERE id = ?", (new.parse().id,))
        assert json.loads(request)["batch"]["requests"] >= 2  # it joined the decode of the running rows
    finally:
        lineage.versions.add("rollback", None, True, "back", {}, {}, {}, current=(f.installed["alpha"], 2))


def test_previous_response_id_of_another_tenant_is_the_unknown_ids_404(fleet):
    """`previous_response_id` naming bravo's response, asked by alpha's key: the very 404 an id
    that does not exist gets, naming the field, not the value."""
    f = fleet
    b = client(f.url, f.keys["bravo"]).responses.create(model="tiny", input="Bravo's secret 4417", max_output_tokens=4)
    bodies = []
    for rid in (b.id, "resp_" + "0" * 48):
        with pytest.raises(openai.NotFoundError) as e:
            client(f.url, f.keys["alpha"]).responses.create(
                model="tiny", input="and?", previous_response_id=rid, max_output_tokens=4
            )
        bodies.append(e.value.body)
        assert rid not in str(e.value.body) and "4417" not in str(e.value.body)
    assert bodies[0] == bodies[1] and bodies[0]["param"] == "previous_response_id"
    own = client(f.url, f.keys["bravo"]).responses.create(
        model="tiny", input="and?", previous_response_id=b.id, max_output_tokens=4
    )
    assert own.previous_response_id == b.id


def test_a_tenants_notes_reach_its_own_prompts_only(fleet):
    """Alpha's note is retrieved into alpha's prompt and never into bravo's (nor the default
    tenant's note into either); the default tenant gets its own."""
    f = fleet
    question = "Which code opens the harbour vault?"
    seen = {}
    for tenant, key in (("alpha", f.keys["alpha"]), ("bravo", f.keys["bravo"]), ("default", KEY)):
        stream = f.server.store.conversation_streams(conv_of(_ask(f.url, key, question, n=2)))[0]
        seen[tenant] = [s.text for s in stream.segments if s.author == "context" and s.meta.get("memory_notes")]
    assert len(seen["alpha"]) == 1 and "7731" in seen["alpha"][0] and "5150" not in seen["alpha"][0]
    assert seen["bravo"] == []
    assert len(seen["default"]) == 1 and "5150" in seen["default"][0] and "7731" not in seen["default"][0]
    assert f.server.tenants.get("bravo").memory.retrieved == 0


def test_a_snapshot_rollback_restores_adapter_context_and_memory(fleet):
    """Alpha's snapshot (adapter version 2, context X, memory version 1), then a new version, a
    new note and a new context; the rollback to it puts version 2, context X and memory version 1
    back (the new note rolled back: `tests/serve/test_tenants_rollback.py` follows it in prompts)."""
    f = fleet
    alpha = f.server.tenants.get("alpha")
    admin = client(f.url)

    def post(path: str, body: dict) -> dict:
        return admin.post(path, cast_to=object, body=body)

    first = post("/tenants/alpha", {"context": "You serve Alpha."})
    assert (first["version"], first["memory"]) == (2, 1)
    install(alpha.lineage, 4, f.refs["alpha1"])
    newer = alpha.lineage.versions.in_force()[1]
    told = Stream("told-2", [Segment("user", "The harbour gate shuts at nine.", role="user")])
    with alpha.memory.lock:
        alpha.memory.memory.add(told.segments[0].text, "extractive", evidence=[Cite(told, 0)])
    second = post("/tenants/alpha", {"context": "You serve Alpha Ltd."})
    assert (second["version"], second["memory"]) == (newer, 2)
    back = post("/tenants/alpha/rollback", {"snapshot": first["id"]})
    assert (back["version"], back["context"], back["snapshot"]) == (2, "You serve Alpha.", first["id"])
    assert back["restored"] == ["adapter", "context", "memory"] and back["memory_rollback"]["rolled_back"] == [2]
    assert (back["memory"], back["memory_at_snapshot"]) == (1, 1)
    assert alpha.lineage.versions.in_force()[1] == 2 and f.server.tenants.adapter_of("alpha")[0] == f.installed["alpha"]
