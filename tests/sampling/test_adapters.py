"""Many LoRA adapters in one batch: every row draws what its adapter alone draws (fp32), rows joining
mid-decode, with the prefix cache, across a new version of one adapter; the prefix cache never
serves an entry across adapters; the adapter pool's least-recently-used eviction."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import seeded, small_config

from dostream.cached_forward import CachedForward
from dostream.sampling import Decode, PrefixCache, SamplingConfig, sample
from dostream.sampling.adapters import AdapterPool, Lora

HEAD = "<|im_start|>system\nYou are a careful assistant who answers briefly.<|im_end|>\n<|im_start|>user\n"
TEXTS = ["What is 2+2?", "Hi", "The resistor carries 2 A at 4 ohm, so the voltage", "Name a colour."]


@pytest.fixture(scope="module")
def family(tok):
    """A base Llama and three PEFT LoRA adapters of it (random B: their deltas are real, as large
    as the base's own logits move), each a `PeftModel` (the reference) and a `Lora`."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = seeded(lambda: LlamaForCausalLM(small_config(LlamaConfig, tok)))
    targets = [
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ["q_proj", "v_proj", "up_proj"],
        ["k_proj", "o_proj", "down_proj", "gate_proj"],
    ]
    peft, loras = {}, {}
    for i, target in enumerate(targets):
        with torch.random.fork_rng():
            torch.manual_seed(10 + i)
            model = get_peft_model(
                copy.deepcopy(base),
                LoraConfig(r=4 + 2 * i, lora_alpha=8, target_modules=target, init_lora_weights=False),
            ).eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.normal_(0, 0.6)
        peft[f"t{i}"] = model
        loras[f"t{i}"] = Lora.from_peft(f"t{i}@v1", model)
    return base, peft, loras


def _alone(peft, tok, prompt, cfg, seed):
    return sample(peft, tok, [prompt], cfg, row_seeds=[seed])[0].token_ids


@pytest.mark.parametrize("greedy", [True, False])
def test_rows_of_many_adapters_draw_what_each_alone_draws(family, tok, greedy):
    """Rows of three adapters and the base, half of them joining a running decode, one prompt twice
    under two adapters, the prefix cache on: each row's ids are its adapter's alone (`sample` with
    the `PeftModel`, PEFT's own LoRA layers), and differ between adapters."""
    base, peft, loras = family
    prompts = [tok(HEAD + t)["input_ids"] for t in TEXTS]
    cfg = SamplingConfig(greedy=greedy, temperature=0.8, max_new_tokens=10, seed=7, precision="fp32")
    plan = [("t0", 0), ("t1", 1), (None, 2), ("t2", 3), ("t1", 0), ("t0", 2), ("t2", 1), (None, 0)]
    run = Decode(base, tok, forward=CachedForward.build(base), prefix_cache=PrefixCache(base, min_tokens=4))
    got = {}

    def add(rows):
        run.add(
            [prompts[p] for _, (_, p) in rows],
            [(7, k) for k, _ in rows],
            [cfg] * len(rows),
            [k for k, _ in rows],
            adapters=[None if a is None else loras[a] for _, (a, _) in rows],
        )

    rows = list(enumerate(plan))
    add(rows[:4])
    for _ in range(3):
        got.update({row.tag: row.ids for row in run.step()})
    add(rows[4:])  # join mid-decode
    while run.active:
        got.update({row.tag: row.ids for row in run.step()})
    assert run.prefix_cache.reused > 0 and run.prefix_cache.adapters() >= {"t0@v1", "t1@v1"}
    for k, (a, p) in enumerate(plan):
        model = base if a is None else peft[a]
        assert got[k] == _alone(model, tok, prompts[p], cfg, (7, k)), (k, a, p)
    assert got[0] != got[4] or got[2] != got[5]  # the same prompt under other adapters: other ids


def test_a_new_version_mid_decode_leaves_running_rows_on_theirs(family, tok):
    """Hot swap of one adapter: rows that started on version 1 finish on it; rows added after the
    swap get version 2 (another key: none of version 1's prefix entries is read for them)."""
    base, peft, loras = family
    prompts = [tok(HEAD + t)["input_ids"] for t in TEXTS]
    cfg = SamplingConfig(greedy=True, max_new_tokens=8, precision="fp32")
    v2 = Lora.from_peft("t0@v2", peft["t2"])  # version 2 of tenant t0: other weights
    run = Decode(base, tok, forward=CachedForward.build(base), prefix_cache=PrefixCache(base, min_tokens=4))
    run.add(prompts[:2], [(0, 0), (0, 1)], [cfg] * 2, ["old0", "old1"], adapters=[loras["t0"]] * 2)
    got = {}
    for _ in range(2):
        got.update({r.tag: r.ids for r in run.step()})
    run.add(prompts[:2], [(0, 2), (0, 3)], [cfg] * 2, ["new0", "new1"], adapters=[v2] * 2)
    while run.active:
        got.update({r.tag: r.ids for r in run.step()})
    for i in range(2):
        assert got[f"old{i}"] == _alone(peft["t0"], tok, prompts[i], cfg, (0, 0))
        assert got[f"new{i}"] == _alone(peft["t2"], tok, prompts[i], cfg, (0, 0))
    entries = run.prefix_cache._entries
    assert {owner for owner, _ in entries} == {"t0@v1", "t0@v2"}


def test_the_prefix_cache_never_serves_an_entry_across_adapters(family, tok):
    """The same prompts under another adapter (or none) make and read their own entries: the same
    ids, other keys and values."""
    base, _, loras = family
    step = CachedForward.build(base)
    head = tuple(tok(HEAD)["input_ids"])
    a, b = head + tuple(tok("one two")["input_ids"]), head + tuple(tok("three four")["input_ids"])
    cache = PrefixCache(base, min_tokens=4)
    found = {}
    with torch.inference_mode():
        for key, lora in (("t0@v1", loras["t0"]), ("t1@v1", loras["t1"]), ("", None)):
            hits = cache.hits([a, b], tok.pad_token_id, step, [lora] * 2)
            assert {h.adapter for h in hits} == {key}  # its own entries, never another adapter's
            found[key] = hits[1]
    assert cache.adapters() == set(found)
    n = len(head)  # the head's keys in the last layer: each adapter's own
    for x, y in (("t0@v1", "t1@v1"), ("t0@v1", ""), ("t1@v1", "")):
        assert not torch.allclose(found[x].keys[-1][:, :, :n], found[y].keys[-1][:, :, :n])


def test_an_adapter_directory_loads_as_peft_holds_it(family, tmp_path):
    _, peft, loras = family
    peft["t1"].save_pretrained(tmp_path / "t1")
    got = Lora.from_dir("t1@v1", tmp_path / "t1")
    want = loras["t1"]
    assert set(got.weights) == set(want.weights)
    for where, (a, b, s) in want.weights.items():
        ga, gb, gs = got.weights[where]
        assert torch.equal(ga, a) and torch.equal(gb, b) and gs == s


def test_the_pool_evicts_least_recently_used_under_its_limits(family):
    _, _, loras = family
    make = {k: (lambda k=k: Lora(f"{k}@v1", loras[k].weights)) for k in loras}
    pool = AdapterPool(max_adapters=2)
    pool.get("t0@v1", make["t0"]), pool.get("t1@v1", make["t1"]), pool.get("t0@v1")
    pool.get("t2@v1", make["t2"])  # t1 was used least recently
    assert pool.held() == ["t0@v1", "t2@v1"] and pool.evictions == 1
    with pytest.raises(KeyError):
        pool.get("t1@v1")
    sizes = {k: Lora(k, loras[k].weights).nbytes for k in loras}
    pool = AdapterPool(max_adapters=8, max_bytes=sizes["t0"] + sizes["t1"])
    for k in ("t0", "t1", "t2"):
        pool.get(f"{k}@v1", make[k])
    assert pool.held() == (["t1@v1", "t2@v1"] if sizes["t1"] + sizes["t2"] <= pool.max_bytes else ["t2@v1"])
    assert pool.loads == 3


def _logits(forward, ids, loras=None):
    """Last-position logits of the rows `ids` (B, T), a fresh cache, one forward."""
    from transformers import DynamicCache

    b, t = ids.shape
    cache = DynamicCache(config=forward.model.config)
    part = (ids, torch.arange(t)[None].expand(b, t), torch.ones(b, t, dtype=torch.long), cache)
    with torch.inference_mode():
        [out] = forward.many([(*part, loras)] if loras is not None else [part])
    return out


@pytest.mark.parametrize(
    "plan",
    [
        ["t0", "t0", "t0"],  # one adapter, every row: nothing gathered
        ["t1", None, "t1"],  # one adapter and the base's rows
        ["t2", "t0", None, "t1", "t0", "t2", "t1"],  # rows grouped out of order, groups of other sizes
    ],
)
def test_each_row_gets_its_own_adapters_products(family, tok, plan):
    """`Mix`'s grouping: each row's logits are its adapter's alone (the PEFT model's own layers,
    one row) up to float rounding, the base's rows the base's; one adapter over every row
    gathers nothing. The same prompt under other adapters moves the logits by far more."""
    from dostream.sampling.adapters import Mix

    base, peft, loras = family
    forward = CachedForward.build(base)
    ids = torch.tensor([tok(HEAD + TEXTS[0])["input_ids"]] * len(plan))
    got = _logits(forward, ids, [None if a is None else loras[a] for a in plan])
    alone = {a: _logits(CachedForward.build(base if a is None else peft[a]), ids[:1])[0] for a in set(plan)}
    for row, a in enumerate(plan):
        torch.testing.assert_close(got[row], alone[a], rtol=1e-4, atol=1e-4)
    others = [alone[a] for a in alone if a != plan[0]]
    assert all((alone[plan[0]] - other).abs().max() > 0.1 for other in others)
    mix = Mix([loras[a] if a else None for a in plan for _ in range(ids.shape[1])], {})
    assert mix.gather == (len(set(plan)) > 1 or None in plan)


def test_the_bank_keeps_slots_and_gathers_a_sparse_step(family, tok):
    """Adapters keep their bank slots from step to step; past its size the least recently used
    slot not in the step is taken; a step whose adapters lie far apart in the bank gathers their
    weights when the idle slots between them would pad many rows (else it takes the bank's view);
    every row's logits stay its adapter's."""
    from dostream.sampling.adapters import Mix

    base, peft, loras = family
    copies = {f"c{i}": Lora(f"c{i}@v1", loras[f"t{i % 3}"].weights) for i in range(6)}  # other objects, other slots
    forward = CachedForward.build(base)
    ids = torch.tensor([tok(HEAD + TEXTS[1])["input_ids"]] * 2)
    alone = {i: _logits(CachedForward.build(peft[f"t{i}"]), ids[:1])[0] for i in range(3)}

    short = {i: _logits(CachedForward.build(peft[f"t{i}"]), ids[:1, :8])[0] for i in range(3)}

    def step(names, tokens=None):
        got = _logits(forward, ids[: len(names), :tokens].expand(len(names), -1), [copies[n] for n in names])
        for row, n in enumerate(names):
            want = (alone if tokens is None else short)[int(n[1]) % 3]
            torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)
        return forward._stacks["bank"]

    bank = step(["c0", "c1"])
    bank = step(["c2", "c3"])
    assert bank.members[:4] == [copies[n] for n in ("c0", "c1", "c2", "c3")]
    step(["c4", "c0"])
    assert bank.members.index(copies["c0"]) == 0  # kept its slot
    mix = Mix([copies["c0"], copies["c4"]], forward._stacks)
    assert mix.span == (0, 5)  # slots 0 and 4 of 5, a row each: the bank's view, 3 idle rows padded
    mix = Mix([copies["c0"]] * 40 + [copies["c4"]] * 40, forward._stacks)
    assert mix.span is None  # 40 rows each: 3 idle slots would pad 120 rows, so only theirs, gathered
    step(["c0", "c4"])  # gathered
    step(["c0", "c4"], tokens=8)  # 8 rows each: the bank's view, 24 idle rows padded
    small = {}  # a bank of 2: c2 takes c0's slot (both used as long ago); then c0 takes c2's, c1 stays
    for names in (["c0", "c1"], ["c2"], ["c0", "c1"]):
        Mix([copies[n] for n in names], small, keep=2)
    assert small["bank"].members == [copies["c0"], copies["c1"]]
