"""The continual agent's learners (dostream/learning/learners.py): DAPO's parts against hand-computed
values, the dual adapter's gradient isolation (bit for bit, both directions), the saved dual
adapter under PEFT alone, a smoke run of every learner, and --resume after SIGKILL mid-update."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_AGENT, run_cli

from dostream.agent.loop import Agent, AgentConfig, run
from dostream.agent.store import Store
from dostream.envs import support
from dostream.learning import learners as L
from dostream.learning import policy_gradient as pg
from dostream.learning.config import LEARNERS, REWARD_LEARNERS
from dostream.stream import Segment, Stream

TINY = {**TINY_AGENT, "temperature": 1.0, "lora_r": 4, "lora_alpha": 8, "dual_rank": 8}

# A rigged world for the tiny random model (which never names the right detail): a turn whose
# text has a length divisible by 3 succeeds whatever it says, so groups have differing outcomes
# and the reward learners have something to learn from. The same text always gets the same answer.
RIG = """
from dostream.envs import support
_real = support.SupportEnv.step
def _step(self, text, token_ids=None):
    if len(text) % 3 == 0:
        kind = self.task.required
        r = _real(self, " " + support.ITEMS[kind].phrase.format(self.task.details[kind]) + ".\\n", token_ids)
        return r
    return _real(self, text, token_ids)
support.SupportEnv.step = _step
"""


@pytest.fixture
def rigged():
    real = support.SupportEnv.step
    exec(RIG, {})
    yield
    support.SupportEnv.step = real


# -- DAPO's parts, by hand --------------------------------------------------------------------


def test_overlong_penalty_is_dapo_s_soft_punishment():
    # max 24, buffer 8: free up to 16 tokens, then linear to -1 at 24, -1 beyond; buffer 0: off
    assert [pg.overlong_penalty(n, 24, 8) for n in (1, 16, 17, 20, 23, 24, 30)] == [
        0.0,
        0.0,
        -1 / 8,
        -0.5,
        -7 / 8,
        -1.0,
        -1.0,
    ]
    assert pg.overlong_penalty(30, 24, 0) == 0.0


def _stream(n_tokens: int, reward: float, group: int = 0) -> Stream:
    return Stream(
        f"e{n_tokens}",
        [
            Segment("context", "Call the bank.\n"),
            Segment("protocol", "Agent:"),
            Segment("agent", " x" * n_tokens, token_ids=[1792] * n_tokens),  # " x" is one token
        ],
        {"reward": reward, "group": group},
    )


def test_make_rollouts_shapes_the_advantage_but_filters_on_outcomes(tok):
    from dostream.render import Renderer

    renderer = Renderer(tok, add_eos=False)
    # lengths 5, 5, 22, 5 with max 24 and buffer 6: the 22-token turn loses (24-6-22)/6 = 2/3
    group = [_stream(5, 1.0), _stream(5, 0.0), _stream(22, 0.0), _stream(5, 0.0)]
    rs = pg.make_rollouts(group, [1.0, 0.0, 0.0, 0.0], renderer, 7, max_len=24, buffer=6)
    shaped = [1.0, 0.0, -2 / 3, 0.0]
    mean = sum(shaped) / 4
    var = sum((x - mean) ** 2 for x in shaped) / 4
    assert [r.advantage for r in rs] == pytest.approx([(x - mean) / math.sqrt(var + 1e-6) for x in shaped])
    assert [r.reward for r in rs] == [1.0, 0.0, 0.0, 0.0] and {r.group for r in rs} == {7}
    assert [sum(r.action) for r in rs] == [5, 5, 22, 5]  # the agent's tokens, nothing else
    # All failed, but at different lengths: shaped rewards differ, the outcomes do not; dropped.
    flat = pg.make_rollouts(group[1:] + [_stream(5, 0.0)], [0.0] * 4, renderer, 8, max_len=24, buffer=6)
    assert len({r.advantage for r in flat}) > 1
    kept, dropped = pg.dynamic_sampling_filter([rs, flat, pg.make_rollouts(group, [1.0] * 4, renderer, 9)])
    assert dropped == 2 and [g[0].group for g in kept] == [7]


def test_clip_higher_bounds_by_hand():
    """ε_low 0.2, ε_high 0.28, token-level mean over 4 tokens. A > 0: ρ 1.29 is clipped (1.28,
    no gradient), 1.27 is not; A < 0: ρ 0.79 is clipped (0.8, no gradient), 0.81 is not."""
    cfg = pg.GRPOConfig(dapo=True, epsilon=0.2, epsilon_high=0.28, beta=0.0)
    ratio = torch.tensor([1.29, 1.27, 0.79, 0.81])
    old = torch.log(torch.tensor([0.1, 0.1, 0.1, 0.1]))
    logp = (old + torch.log(ratio)).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = pg.policy_loss(logp, old, old, adv, [2, 2], cfg, norm=4.0)
    assert float(loss.detach()) == pytest.approx((-1.28 - 1.27 + 0.8 + 0.81) / 4, abs=1e-6)
    loss.backward()
    # d(-ρA)/dlogp = -ρA / norm where unclipped, 0 where clipped
    assert logp.grad.tolist() == pytest.approx([0.0, -1.27 / 4, 0.0, 0.81 / 4], abs=1e-6)
    assert stats["clip_frac"] == 0.5
    # plain GRPO's symmetric range clips 1.27 as well (at 1.2)
    g = pg.GRPOConfig(dapo=False, epsilon=0.2, beta=0.0)
    loss, _ = pg.policy_loss(logp.detach(), old, old, adv, [2, 2], g, norm=2.0)
    assert float(loss) == pytest.approx(((-1.2 - 1.2) / 2 + (0.8 + 0.81) / 2) / 2, abs=1e-6)


def test_token_level_normalisation_by_hand():
    """One 1-token attempt with A = -1 and one 3-token attempt with A = +1, at ρ = 1: DAPO's
    token-level mean is (1·1 - 3·1)/4 = -0.5; GRPO's per-attempt mean is (1 - 1)/2 = 0. Split
    into micro-batches with the step's token count as the norm, the parts add up to the same."""
    logp = torch.log(torch.tensor([0.5, 0.4, 0.3, 0.2]))
    adv = torch.tensor([-1.0, 1.0, 1.0, 1.0])
    dapo = pg.GRPOConfig(dapo=True, beta=0.0)
    whole, _ = pg.policy_loss(logp, logp, logp, adv, [1, 3], dapo, norm=4.0)
    assert float(whole) == pytest.approx(-0.5)
    parts = (
        pg.policy_loss(logp[:1], logp[:1], logp[:1], adv[:1], [1], dapo, norm=4.0)[0]
        + pg.policy_loss(logp[1:], logp[1:], logp[1:], adv[1:], [3], dapo, norm=4.0)[0]
    )
    assert float(parts) == pytest.approx(-0.5)
    grpo_loss, _ = pg.policy_loss(logp, logp, logp, adv, [1, 3], pg.GRPOConfig(beta=0.0), norm=2.0)
    assert float(grpo_loss) == pytest.approx(0.0, abs=1e-7)


# -- the dual adapter ------------------------------------------------------------------------


def _cfg(learner="dual", **kw):
    return AgentConfig(env="support", learner=learner, group_size=4, **{**TINY, **kw})


def _perturbed(cfg, seed=0):
    """A learner model whose every A and B is nonzero (a fresh B is zero, and then no gradient
    reaches A: the test would pass vacuously)."""
    model = L.build_model(cfg, None, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in L.adapter_params(model, list(L.parts_of(cfg))).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _snapshot(model, names):
    return {k: p.detach().clone() for k, p in L.adapter_params(model, names).items()}


def _same(model, snap) -> bool:
    params = dict(model.named_parameters())
    return all(torch.equal(params[k], v) for k, v in snap.items())


def _moved(model, snap) -> bool:
    params = dict(model.named_parameters())
    return all(not torch.equal(params[k], v) for k, v in snap.items() if ".lora_B." in k)


def _rollouts(tok):
    from dostream.render import Renderer

    renderer = Renderer(tok, add_eos=False)
    group = [_stream(3, 1.0), _stream(4, 0.0), _stream(5, 0.0), _stream(2, 1.0)]
    return pg.make_rollouts(group, [s.meta["reward"] for s in group], renderer, 0)


def _rows(tok):
    from dostream.render import Renderer, encode_rows
    from dostream.stream import view_authors

    world = Stream("w", [*_stream(3, 0.0).segments, Segment("environment", " I need the security PIN.\n")], {})
    rows, _ = encode_rows([world] * 4, Renderer(tok), view_authors("interventional"), max_length=64)
    return rows


def test_dual_isolation_is_bit_exact_both_ways(tok, tmp_path):
    """A policy step leaves the world half bit-identical; a world step (AdamW with weight decay,
    even) leaves the policy half bit-identical. The base weights never move. dual-shared, the
    ablation, moves both halves with either loss."""
    cfg = _cfg("dual")
    model = _perturbed(cfg)
    base = {k: p.detach().clone() for k, p in model.named_parameters() if "lora_" not in k}
    gcfg = L.policy_config(cfg, 8, after=8)

    policy, world = _snapshot(model, ["policy"]), _snapshot(model, ["world"])
    stats = L.policy_phase(model, _rollouts(tok), gcfg, ["policy"], tok.pad_token_id)
    assert math.isfinite(stats["train/loss"])
    assert _moved(model, policy), "the policy step did not move the policy half"
    assert _same(model, world), "the policy step moved the world half"

    policy, world = _snapshot(model, ["policy"]), _snapshot(model, ["world"])
    tcfg = L._train_config(cfg, 8, "interventional", 8, 16)
    tcfg.weight_decay, tcfg.lr = 0.1, 1e-2  # decay would shrink any weight the optimizer held
    L.world_phase(model, _rows(tok), tcfg, ["world"], tmp_path / "world", tok.pad_token_id)
    assert _moved(model, world), "the world step did not move the world half"
    assert _same(model, policy), "the world step moved the policy half"
    assert all(torch.equal(p, base[k]) for k, p in model.named_parameters() if k in base)

    shared_cfg = _cfg("dual-shared")
    shared = _perturbed(shared_cfg)
    every = _snapshot(shared, ["default"])
    L.policy_phase(shared, _rollouts(tok), gcfg, ["default"], tok.pad_token_id)
    params = dict(shared.named_parameters())
    # ranks R/2..R of the shared adapter (the "world" ranks) move under the policy loss too
    assert all(not torch.equal(params[k][:, 4:], v[:, 4:]) for k, v in every.items() if ".lora_B." in k)


def test_dual_and_dual_shared_start_from_the_same_weights():
    a = L.merged_state(L.build_model(_cfg("dual"), None, 5), _cfg("dual"))
    b = L.merged_state(L.build_model(_cfg("dual-shared"), None, 5), _cfg("dual-shared"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not v.any() for k, v in a.items() if ".lora_B." in k)  # the base model, to start


def test_the_saved_dual_adapter_under_peft_alone_gives_the_loop_s_logits(tok, tmp_path):
    from peft import PeftModel

    from dostream.models import tiny_model

    cfg = _cfg("dual")
    model = _perturbed(cfg, seed=3)
    L.save_adapter(model, cfg, tmp_path / "adapter")
    split = json.loads((tmp_path / "adapter" / "dual.json").read_text())
    assert split["rank"] == 8 and split["policy_ranks"] == [0, 4] and split["world_ranks"] == [4, 8]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8

    ids = torch.tensor([tok("Agent: Calling Bluebird Bank. I have ready the user's")["input_ids"]])
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits  # the two halves as two active adapters
        user = PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        agent = Agent.__new__(Agent)  # the loop's own loader: the adapter merged into the base
        agent.cfg, agent.out, agent._acting = cfg, tmp_path, {}
        acting = agent.model_for("adapter")(input_ids=ids).logits
        plain = tiny_model(0).eval()(input_ids=ids).logits
    assert torch.allclose(user, acting, atol=1e-5) and torch.allclose(user, trained, atol=1e-5)
    assert not torch.allclose(user, plain, atol=1e-3)  # the adapter does change the logits
    # the one policy half (the first R/2 ranks) under PEFT alone too, for who wants it apart
    reloaded = L.build_model(cfg, L.load_state(tmp_path / "adapter"), 0)
    assert all(
        torch.equal(p, q) for p, q in zip(L.merged_state(reloaded, cfg).values(), L.merged_state(model, cfg).values())
    )


# -- the loop, every learner ------------------------------------------------------------------


@pytest.mark.parametrize("learner", LEARNERS)
def test_smoke_every_learner(learner, tmp_path, rigged):
    out = tmp_path / learner
    summary = run(_cfg(learner, episodes=24), out)
    assert summary["episodes"] == 24
    assert [e["after_episodes"] for e in summary["evals"]] == [0, 8, 16, 24]
    store = Store(out / "store.sqlite")
    streams = store.episodes()
    # every loop plays the same calls: each item 4 times in a row
    assert [s.meta["group"] for s in streams] == [seq // 4 for seq in range(24)]
    assert (
        len({s.segments[0].text for s in streams[:4]}) == 1
        and streams[3].segments[0].text != streams[4].segments[0].text
    )
    rewards = [s.meta["reward"] for s in streams]
    assert 0 < sum(rewards) < len(rewards), "the rig should make some episodes succeed"
    ups = summary["updates"]
    if learner == "none":
        assert ups == [] and not (out / "adapters").exists()
        return
    assert [u["after_episodes"] for u in ups] == [8, 16]
    for u in ups:
        m = u["metrics"]
        if learner in REWARD_LEARNERS:
            assert m["groups"] == 2 and m["groups_informative"] + m["groups_all_success"] + m["groups_all_fail"] == 2
            if m["groups_informative"]:
                assert math.isfinite(m["policy/loss"]) and m["policy/attempts"] == 4 * m["groups_informative"]
        if learner in ("dual", "dual-shared", "interventional", "observational"):
            assert u["candidate"].endswith("/adapter") and (out / u["candidate"]).is_dir()
        if learner in ("dual", "dual-shared"):
            assert math.isfinite(m["world/loss"]) and m["world/steps"] >= 1
    assert any(u["metrics"].get("groups_informative") for u in ups) or learner not in REWARD_LEARNERS
    assert not list(out.glob("adapters/*/**/checkpoints")), "recorded updates keep no checkpoints"
    if learner in REWARD_LEARNERS and store.current_adapter():
        r = json.loads((out / store.current_adapter() / "adapter_config.json").read_text())["r"]
        assert r == (4 if learner == "dapo" else 8)


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_run_learners_share_one_sequence_and_the_report_names_them(tmp_path, rigged):
    from dostream.agent.loop import run_learners
    from dostream.agent.report import write_report

    out = tmp_path / "cmp"
    cfg = AgentConfig(env="support", **{**TINY, "eval_n": 2, "gate_control": 2, "gate_learned": 1})
    summaries = run_learners(cfg, ["dual", "none"], out, log=lambda m: None)
    assert set(summaries) == {"dual", "none"}
    record = json.loads((out / "config.json").read_text())
    assert record["learners"] == ["dual", "none"] and record["config"]["group_size"] == 4  # K resolved once
    a, b = (Store(out / x / "store.sqlite") for x in ("dual", "none"))
    # before the first update both loops acted with the base model: the same episodes
    assert [s.to_json()["segments"] for s in a.episodes(0, 8)] == [s.to_json()["segments"] for s in b.episodes(0, 8)]
    # the base model's held-out answers were computed once and shared: they are what a loop of
    # its own (no shared memo) computes, at the start for both and at every evaluation of `none`
    from dostream.agent.loop import Agent

    fresh = Agent(replace(cfg, learner="none", group_size=4), tmp_path / "fresh", log=lambda m: None)
    base = sum(fresh.successes(None, fresh.heldout, "heldout"))
    fresh.store.close()
    assert [e["successes"] for e in b.evals("heldout")] == [base] * len(b.evals("heldout"))
    assert a.evals("heldout")[0]["successes"] == base
    write_report(out)
    text = (out / "report.md").read_text()
    assert "Dual LoRA" in text and "groups informative" in text
    assert set(json.loads((out / "results.json").read_text())["rule_probe"]["models"]) >= {"base"}


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_cli_learners_flag_and_the_deprecated_views_alias(tmp_path):
    common = ["--env", "support", "--model", "tiny", "--episodes", "4", "--update-every", "4", "--eval-every", "4"]
    common += ["--eval-n", "1", "--gate-control", "0", "--gate-learned", "0", "--max-new-tokens", "4", "--no-progress"]
    run_cli("agent", "run", "--out", tmp_path / "a", "--learners", "none", "--no-report", *common)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["learners"] == ["none"]
    old = run_cli("agent", "run", "--out", tmp_path / "b", "--views", "none", "--no-report", *common)
    assert "deprecated" in old.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["learners"] == ["none"]
    bad = run_cli("agent", "run", "--out", tmp_path / "c", "--learners", "dapo,robots", *common, check=False)
    assert bad.returncode == 2 and "robots" in bad.stderr
    k1 = run_cli(
        "agent", "run", "--out", tmp_path / "d", "--learners", "dapo", "--group-size", "1", *common, check=False
    )
    assert k1.returncode == 2 and "group_size" in k1.stderr


# -- SIGKILL mid-update, dual ------------------------------------------------------------------


def _dual_cmd(out, *extra):
    argv = ["agent", "run", "--env", "support", "--model", "tiny", "--out", str(out), "--learners", "dual"]
    argv += ["--episodes", "24", "--update-every", "8", "--group-size", "4", "--eval-every", "8", "--eval-n", "3"]
    argv += ["--gate-control", "3", "--gate-learned", "2", "--epochs", "2", "--batch-size", "2"]
    argv += ["--max-new-tokens", "8", "--temperature", "1.0", "--lora-r", "4", "--lora-alpha", "8"]
    argv += ["--dual-rank", "8", "--no-progress", "--no-report", *extra]
    driver = RIG + f"\nimport sys\nfrom dostream.cli.main import main\nsys.exit(main({argv!r}))\n"
    return [sys.executable, "-c", driver]


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_sigkill_mid_dual_update_resumes_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run(_dual_cmd(tmp_path / "a"), check=True, capture_output=True, env=env, timeout=300)

    proc = subprocess.Popen(_dual_cmd(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    started = tmp_path / "b" / "dual" / "adapters" / "update-000016" / "world" / "config.json"  # the world phase
    deadline = time.time() + 240
    while time.time() < deadline and not started.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(tmp_path / "b" / "dual" / "store.sqlite")
    assert store.n_episodes() == 16 and not store.has_update(16), "the kill did not land inside the second update"
    store.close()
    subprocess.run(_dual_cmd(tmp_path / "b", "--resume"), check=True, capture_output=True, env=env, timeout=300)

    a, b = (Store(tmp_path / x / "dual" / "store.sqlite") for x in "ab")
    assert [r[0] for r in b.db.execute("SELECT seq FROM episodes ORDER BY seq")] == list(range(24))
    assert [u["after_episodes"] for u in b.updates()] == [8, 16]
    assert any(u["metrics"].get("groups_informative") for u in a.updates()), "the policy phase never ran"
    assert [s.to_json() for s in a.episodes()] == [s.to_json() for s in b.episodes()]
    from safetensors.torch import load_file

    wa, wb = (
        load_file(str(tmp_path / x / "dual" / "adapters" / "update-000016" / "adapter" / "adapter_model.safetensors"))
        for x in "ab"
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # the redone update, bit for bit
