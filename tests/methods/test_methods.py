"""The STEM methods: GRPO advantages and loss, DAPO dynamic sampling, ReST selection, the stream
and its two arms, SFT-1 and oracle-SFT rows."""

import math

import pytest
import torch

from dostream.envs.base import Episode
from dostream.envs.stem import generate
from dostream.learning import policy_gradient as pg
from dostream.methods import grpo, rest, stream_agents
from dostream.methods.attempts import make_env
from dostream.methods.oracle_sft import oracle_rows
from dostream.methods.sft1 import sft1_rows
from dostream.render import IGNORE, Renderer


@pytest.fixture(scope="module")
def problems():
    return generate("agent", 12, seed=0)


def episode(tok, problem, text, id="t"):
    """A one-attempt episode as the stream records it: the agent's exact ids, then the world."""
    ep = Episode(make_env("none"), problem, id=id)
    ep.reset()
    ep.step(text, tok(text, add_special_tokens=False)["input_ids"])
    s = ep.to_stream()
    s.meta["problem_id"] = problem.id
    return s


# -- GRPO / DAPO ----------------------------------------------------------------------------


def test_group_advantages_are_eq10():
    r = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    a = pg.group_advantages(r)
    mean = sum(r) / 8
    var = sum((x - mean) ** 2 for x in r) / 8  # population variance, eps inside the root
    assert a == pytest.approx([(x - mean) / math.sqrt(var + 1e-6) for x in r])
    assert sum(a) == pytest.approx(0.0, abs=1e-9)
    assert sum(x * x for x in a) / 8 == pytest.approx(1.0, abs=1e-5)  # standardised


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_flat_group_has_zero_advantage(value):
    assert pg.group_advantages([value] * 8) == [0.0] * 8
    assert pg.is_flat([value] * 8)
    assert not pg.is_flat([value] * 7 + [1 - value])


def _rollouts(rewards, group):
    return [
        pg.Rollout([1, 2, 3], [False, True, True], a, r, group) for r, a in zip(rewards, pg.group_advantages(rewards))
    ]


def test_dapo_dynamic_sampling_drops_flat_groups():
    groups = [
        _rollouts([1, 1, 1, 1], 0),
        _rollouts([0, 1, 0, 0], 1),
        _rollouts([0, 0, 0, 0], 2),
        _rollouts([1, 0, 1, 1], 3),
    ]
    kept, dropped = pg.dynamic_sampling_filter(groups)
    assert dropped == 2
    assert [g[0].group for g in kept] == [1, 3]


def test_policy_loss_on_policy_is_minus_mean_advantage():
    """At ρ = 1 and the reference equal to the policy, the loss is -A averaged per attempt (GRPO)
    or per token (DAPO); the two differ when attempts have different lengths."""
    logp = torch.log(torch.tensor([0.5, 0.25, 0.5, 0.1, 0.2]))
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0, -2.0])
    lengths = [2, 3]
    cfg = pg.GRPOConfig()
    loss, stats = pg.policy_loss(logp, logp, logp, adv, lengths, cfg, norm=2.0)
    assert float(loss) == pytest.approx(-(1.0 + -2.0) / 2)
    assert stats["kl"] == pytest.approx(0.0) and stats["clip_frac"] == 0.0
    dapo = pg.GRPOConfig(dapo=True)
    loss, _ = pg.policy_loss(logp, logp, logp, adv, lengths, dapo, norm=5.0)
    assert float(loss) == pytest.approx(-(2 * 1.0 + 3 * -2.0) / 5)


def test_policy_loss_clips_and_penalises_kl():
    """A token whose ratio is past 1+ε with A > 0 gets no gradient (clipped); the k3 KL term is
    non-negative and pulls logp toward the reference."""
    cfg = pg.GRPOConfig(beta=0.0)
    old = torch.log(torch.tensor([0.2, 0.2]))
    logp = torch.log(torch.tensor([0.3, 0.21])).requires_grad_()  # ratios 1.5 (clipped) and 1.05
    loss, stats = pg.policy_loss(logp, old, old, torch.tensor([1.0, 1.0]), [2], cfg, norm=1.0)
    loss.backward()
    assert logp.grad[0] == 0.0 and logp.grad[1] < 0
    assert stats["clip_frac"] == 0.5
    # clip-higher: with DAPO's ε_high = 0.28 the 1.05 and even a 1.25 ratio are not clipped
    logp2 = torch.log(torch.tensor([0.25, 0.21])).requires_grad_()
    pg.policy_loss(logp2, old, old, torch.tensor([1.0, 1.0]), [2], pg.GRPOConfig(dapo=True, beta=0.0), 2.0)[
        0
    ].backward()
    assert (logp2.grad < 0).all()
    kl_cfg = pg.GRPOConfig(beta=1.0)
    x = torch.tensor([-1.0], requires_grad=True)
    loss, stats = pg.policy_loss(x, x.detach(), torch.tensor([-2.0]), torch.tensor([0.0]), [1], kl_cfg, 1.0)
    assert stats["kl"] > 0
    loss.backward()
    assert x.grad[0] > 0  # descending the loss lowers logp toward the reference's -2


def test_grpo_update_moves_only_the_adapter_and_zero_signal_moves_nothing(tok):
    from dostream.models import load_model
    from dostream.train import TrainConfig, prepare_model

    model = prepare_model(TrainConfig(model="tiny", lora_r=4, lora_alpha=8), load_model("tiny"))
    ids = tok("Question:\nx?\n\nProposed solution:\nV = 2 V. Final answer: 2 V.", add_special_tokens=False)["input_ids"]
    action = [i >= 8 for i in range(len(ids))]

    def batch(advs):
        return [pg.Rollout(ids, action, a, 0.0, 0) for a in advs]

    trainable = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    cfg = pg.GRPOConfig(beta=0.0, iterations=1, micro_batch=2)
    rs = batch([0.0, 0.0])
    pg.reference_logps(model, rs, tok.pad_token_id, 2, bf16=False)
    pg.policy_update(model, opt, [p for p in model.parameters() if p.requires_grad], rs, tok.pad_token_id, cfg, False)
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trainable[k]), f"{k} moved without any signal"
    rs = batch([1.5, -0.5, -0.5, -0.5])
    pg.reference_logps(model, rs, tok.pad_token_id, 3, bf16=False)
    assert all(torch.allclose(r.old_logp, r.ref_logp) for r in rs)  # a fresh adapter starts at SFT-1
    stats = pg.policy_update(
        model,
        opt,
        [p for p in model.parameters() if p.requires_grad],
        rs,
        tok.pad_token_id,
        pg.GRPOConfig(iterations=2, micro_batch=3),
        False,
    )
    assert math.isfinite(stats["train/loss"])
    assert any(not torch.equal(p, trainable[k]) for k, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(p, frozen[k]) for k, p in model.named_parameters() if not p.requires_grad)


def test_token_logprobs_match_a_full_forward(tok):
    from dostream.models import load_model

    model = load_model("tiny")
    r = pg.Rollout(tok("a b c d e", add_special_tokens=False)["input_ids"], [False, False, True, True, True], 0, 0, 0)
    b = pg._batch([r], tok.pad_token_id)
    with torch.no_grad():
        got = pg._action_logprobs(model, b)
        full = torch.log_softmax(model(input_ids=b["input_ids"]).logits.float(), -1)[0]
    want = torch.stack([full[t - 1, r.input_ids[t]] for t in (2, 3, 4)])
    assert torch.allclose(got, want, atol=1e-5)


# -- ReST -----------------------------------------------------------------------------------


def test_grpo_computes_where_the_device_policy_says(monkeypatch, tok, problems, tmp_path):
    """GRPO takes train()'s device policy: the model goes to the policy's device, every batch it
    scores is on the model's device, and autocast runs there with the policy's precision (bf16
    here, whatever this CPU measures)."""
    from dostream.models import tiny_model
    from dostream.train import DevicePolicy

    tiny_model(0).save_pretrained(tmp_path / "sft1")
    policy, asked, moved, seen = DevicePolicy(torch.device("cpu"), True), [], [], []

    def device_policy(bf16):
        asked.append(bf16)
        return policy

    module_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        moved.extend(a for a in args if a is policy.device)
        return module_to(self, *args, **kwargs)

    def logprobs_at(model, input_ids, attention_mask, score):
        device = next(model.parameters()).device
        on_device = all(t.device == device for t in (input_ids, attention_mask, score))
        seen.append((on_device, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)))
        return real(model, input_ids, attention_mask, score)

    real = pg.logprobs_at
    monkeypatch.setattr(grpo, "device_policy", device_policy)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(pg, "logprobs_at", logprobs_at)
    cfg = pg.GRPOConfig(groups=2, k=2, max_new_tokens=4, bf16="off", progress=False)
    model, info = grpo.train_grpo(problems[:2], tok, cfg, tmp_path / "sft1", tmp_path / "grpo")
    assert asked == ["fp32"] and moved  # the policy decides, not cfg.precision alone (bf16="off" is fp32)
    assert info["groups"] == 2 and len(seen) >= 4  # the sampling policy and the reference, per group
    assert info["backend"] == "torch"  # the rollouts' engine, resolved (auto: torch for a CPU model)
    assert all(s == (True, True, torch.bfloat16) for s in seen)
    assert next(model.parameters()).device == policy.device


def test_rest_keeps_at_most_one_passing_parseable_sample_per_group_deduped(tok, problems):
    p, q = problems[0], problems[1]
    right = p.solution
    other_right = "Final answer: " + right.rsplit("Final answer: ", 1)[1]
    no_marker = right.rsplit(". Final answer:", 1)[0]  # correct by the last-number fallback only
    g1 = [episode(tok, p, t, f"g1k{i}") for i, t in enumerate([right, "Final answer: 1 V.", right, other_right])]
    g2 = [episode(tok, q, t, f"g2k{i}") for i, t in enumerate(["wrong", "Final answer: 0."])]
    g3 = [episode(tok, p, no_marker, "g3k0")]
    assert g3[0].meta["first_correct"], "the fallback reads the last number"
    selected, info = rest.select([g1, g2, g3])
    assert [s.id for s in selected] == ["g1k0"]
    assert info["passing"] == 4 and info["passing_parseable"] == 3 and info["duplicates"] == 1
    assert info["groups_with_pass"] == 1
    assert [s.author for s in selected[0].segments][-1] == "agent"  # the attempt only, no verdict
    two, _ = rest.select([g1], per_group=2)
    assert [s.id for s in two] == ["g1k0", "g1k3"]
    rows, stats = rest.rest_rows(selected, problems[:3], tok)
    assert len(rows) == 4 and stats.supervised_by_author.keys() == {"agent", "teacher"}
    assert rows[0]["input_ids"][-1] != tok.eos_token_id  # no EOS the agent did not sample


# -- the stream and its arms ------------------------------------------------------------------


def test_stream_stops_at_the_nth_wrong_first_attempt(monkeypatch, tok, problems):
    pattern = iter([True, False, True, True, False, False, True, False, True] * 20)

    def fake_attempt(model, tok_, items, sampling, *, tools, ids, progress, **kw):
        return [episode(tok_, p, p.solution if next(pattern) else "no idea", i) for p, i in zip(items, ids)]

    monkeypatch.setattr(stream_agents, "attempt", fake_attempt)
    turns = stream_agents.build_stream(
        None, tok, problems, stream_agents.StreamConfig(n_wrong=4, chunk=3, progress=False)
    )
    assert [t.meta["first_correct"] for t in turns] == [True, False, True, True, False, False, True, False]
    assert not turns[-1].meta["first_correct"]  # cut at the 4th wrong one
    assert [t.meta["turn"] for t in turns] == list(range(8))
    comp = stream_agents.composition(turns)
    assert sum(c["wrong"] for c in comp.values()) == 4 and sum(c["correct"] for c in comp.values()) == 4
    by_id = {p.id: p for p in problems}
    rows, _ = oracle_rows(turns, by_id, tok)
    assert len(rows) == 4  # one direct correction row per wrong attempt


def test_the_two_arms_differ_only_in_labels(tok, problems):
    turns = [
        episode(tok, problems[0], "V = 1 V. Final answer: 1 V.", "w"),
        episode(tok, problems[1], problems[1].solution, "c"),
    ]
    assert [t.meta["first_correct"] for t in turns] == [False, True]
    obs, _ = stream_agents.arm_rows(turns, tok, "observational")
    itv, stats = stream_agents.arm_rows(turns, tok, "interventional")
    assert [r["id"] for r in obs] == ["w", "c"] and [r["id"] for r in itv] == ["w"]  # a correct turn: no gradient
    assert stats.dropped_no_supervised == 1
    assert itv[0]["input_ids"] == obs[0]["input_ids"]
    r = Renderer(tok).render(turns[0])
    for i, (a, b) in enumerate(zip(obs[0]["labels"], itv[0]["labels"])):
        assert b == IGNORE or b == a
        assert (b != IGNORE) == (i > 0 and r.authors[i] == "oracle")
        assert (a != IGNORE) == (i > 0 and r.authors[i] in ("agent", "oracle"))
    # the agent's tokens are its exact ids in both arms
    agent = [t for t, au in zip(r.input_ids, r.authors) if au == "agent"]
    assert agent == tok("V = 1 V. Final answer: 1 V.", add_special_tokens=False)["input_ids"]
    # question, headers and verdict are masked in both
    masked = {au for au, a in zip(r.authors, obs[0]["labels"]) if a == IGNORE}
    assert {"context", "protocol", "verifier"} <= masked


# -- SFT-1 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tools", ["none", "calculator"])
def test_sft1_supervises_only_the_solution(tok, problems, tools):
    rows, stats = sft1_rows(problems[:4], tok, tools)
    assert set(stats.supervised_by_author) == {"teacher"}
    for p, row in zip(problems, rows):
        sup = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
        assert sup[-1] == tok.eos_token_id
        text = tok.decode(sup[:-1])
        if tools == "none":
            assert text == p.solution
        else:
            assert "calc(" in text and text.endswith(p.solution.rsplit(" = ", 1)[1][-20:])
        assert "Question" not in text and p.question not in text


# -- attempts: the stop rule and the calculator -----------------------------------------------


def test_attempt_pauses_for_the_tool_and_cuts_after_the_answer_line(monkeypatch, tok):
    """A scripted sampler: the agent calls the calculator, reads its answer, then writes its final
    line and keeps going; the attempt keeps the sampled ids up to that line's break, exactly."""
    from dostream.envs import rollout
    from dostream.envs.stem import Problem
    from dostream.methods import attempts
    from dostream.sampling import Sample

    p = Problem(
        "p",
        "physics",
        "ohm_voltage",
        "2.50 A through 4.00 ohm. Voltage?",
        "V = I*R = 2.50*4.00 = 10.00 V. Final answer: 10.00 V.",
        10.0,
        "V",
        0.01,
        0.0,
    )
    script = iter(["V = I*R = calc(2.50*4.00)", " V. Final answer: 10.0 V.\nAnd more text"])
    prompts_seen = []

    def fake_sample(model, tok_, prompts, cfg):
        prompts_seen.append(prompts[0])
        text = next(script)
        ids = tok_(text, add_special_tokens=False)["input_ids"]
        return [Sample(ids, tok_.decode(ids), "stop" if text.endswith(")") else "length", len(prompts[0]))]

    monkeypatch.setattr(rollout, "sample", fake_sample)  # the acting loop's sampler
    [s] = attempts.attempt(
        None, tok, [p], attempts.SamplingConfig(max_new_tokens=64), tools="calculator", progress=False
    )
    authors = [seg.author for seg in s.segments]
    assert authors[-4:] == ["agent", "tool", "agent", "verifier"], authors
    last = s.segments[-2]
    assert last.text == " V. Final answer: 10.0 V.\n"
    assert (
        last.token_ids
        == tok(" V. Final answer: 10.0 V.\nAnd more text", add_special_tokens=False)["input_ids"][: len(last.token_ids)]
    )
    assert s.meta["first_correct"]
    # the second call was conditioned on everything so far, tool answer included
    assert tok.decode(prompts_seen[1]).endswith("calc(2.50*4.00) = 10")
