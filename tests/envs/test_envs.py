"""The episode API (StemEnv, the calculator variant, Episode), the acting loop (`envs.rollout`), the
environments by name (`envs.registry`) and the `dostream stem` CLI."""

import json
import subprocess
import sys

import pytest

from dostream.envs import rollout as rollout_module
from dostream.envs.base import Environment, Episode, StepResult
from dostream.envs.calculator import TOOL_HINT, CalculatorStemEnv
from dostream.envs.registry import ENVS, env_spec
from dostream.envs.rollout import rollout
from dostream.envs.stem import (
    QUESTION_HEADER,
    SOLUTION_HEADER,
    VERDICT_INCORRECT,
    Problem,
    StemEnv,
    generate,
    prompt,
    teacher_stream,
)
from dostream.envs.support import SupportEnv, SupportWorld
from dostream.envs.tutor.env import FACTS, TutorEnv
from dostream.sampling import Sample, SamplingConfig
from dostream.stream import VIEWS, read_streams, write_streams

P = Problem(
    "p1",
    "chemistry",
    "molarity",
    "10.0 g of solute (molar mass 40.0 g/mol) is dissolved to make 0.25 L of solution. What is the molarity?",
    "n = m/M = 10.0/40.0 = 0.2500 mol; c = n/V = 0.2500/0.25 = 1.000 M. Final answer: 1.000 M.",
    1.0,
    "M",
    0.01,
    0.0,
)
WRONG = "n = 10.0/40.0 = 0.250 mol; M = n/V = 0.250 M. Final answer: 0.250 M."


def authors(stream):
    return [s.author for s in stream.segments]


def test_envs_satisfy_the_protocol():
    assert isinstance(StemEnv(), Environment) and isinstance(CalculatorStemEnv(), Environment)
    assert isinstance(SupportEnv(SupportWorld(0)), Environment) and isinstance(TutorEnv(), Environment)
    for name in ENVS:
        assert isinstance(env_spec(name, 0).make_env(), Environment)


def test_reset_frames_the_question_like_the_paper():
    segments = StemEnv().reset(P)
    assert [(s.author, s.text) for s in segments] == [
        ("protocol", "Question:\n"),
        ("context", P.question),
        ("protocol", "\n\nProposed solution:\n"),
    ]
    assert "".join(s.text for s in segments) == prompt(P) == f"Question:\n{P.question}\n\nProposed solution:\n"
    assert StemEnv(question_author="user").reset(P)[1].author == "user"
    with pytest.raises(ValueError, match="question_author"):
        StemEnv(question_author="agent")


def test_correct_attempt_ends_the_episode_with_reward_one():
    ep = Episode(StemEnv(), P)
    ep.reset()
    result = ep.step(P.solution, token_ids=[5, 6, 7])
    assert isinstance(result, StepResult) and result.done and result.reward == 1.0 and result.segments == []
    stream = ep.to_stream()
    assert authors(stream) == ["protocol", "context", "protocol", "agent"]
    assert stream.segments[-1].token_ids == [5, 6, 7] and stream.segments[-1].role == "assistant"
    assert stream.meta["correct"] is True and stream.meta["reward"] == 1.0 and stream.meta["skill"] == "molarity"


def test_wrong_attempt_gets_a_verdict_and_the_oracle_correction():
    ep = Episode(StemEnv(), P)
    ep.reset()
    result = ep.step(WRONG, token_ids=[1, 2])
    assert result.done and result.reward == 0.0
    stream = ep.to_stream()
    assert authors(stream) == ["protocol", "context", "protocol", "agent", "verifier", "protocol", "oracle"]
    assert stream.segments[4].text == VERDICT_INCORRECT == "\nVerdict: incorrect.\n"
    assert stream.segments[5].text == "Proposed solution:\n"
    assert stream.segments[6].text == P.solution
    assert stream.meta["verdict"]["correct"] is False and stream.meta["first_correct"] is False
    # Under the interventional view the attempt is masked and the correction supervised.
    supervised = [s.author for s in stream.segments if s.author in VIEWS["interventional"]]
    assert "agent" not in supervised and "oracle" in supervised


def test_several_attempts_and_announced_verdicts():
    env = StemEnv(attempts=2, announce_correct=True)
    ep = Episode(env, P)
    ep.reset()
    first = ep.step(WRONG)
    assert not first.done and [s.author for s in first.segments] == ["verifier", "protocol"]
    second = ep.step(P.solution)
    assert second.done and second.reward == 1.0 and second.segments[0].text == "\nVerdict: correct.\n"
    assert ep.to_stream().meta["first_correct"] is False and ep.to_stream().meta["correct"] is True


def test_episode_guards():
    ep = Episode(StemEnv(), P)
    with pytest.raises(RuntimeError, match="reset"):
        ep.step("x")
    ep.reset()
    ep.step(P.solution)
    with pytest.raises(RuntimeError, match="over"):
        ep.step("again")
    with pytest.raises(RuntimeError, match="reset"):
        StemEnv().step("no episode")
    with pytest.raises(RuntimeError, match="reset"):
        CalculatorStemEnv().step("calc(1+1)")


def test_an_environment_cannot_write_agent_segments():
    from dostream.stream import Segment

    class Bad:
        def reset(self, item):
            return [Segment("agent", "I pretend to be the agent")]

        def step(self, agent_text, token_ids=None):
            return StepResult([], 0.0, True)

    with pytest.raises(ValueError, match="only Episode records agent turns"):
        Episode(Bad(), P).reset()


def test_calculator_episode_interleaves_tool_answers():
    p = Problem(
        "c1",
        "physics",
        "ohm_voltage",
        "A current of 2.50 A flows through a 4.00 Ω resistor. What is the voltage?",
        "V = I*R = 2.50*4.00 = 10.00 V. Final answer: 10.00 V.",
        10.0,
        "V",
        0.01,
        0.0,
    )
    ep = Episode(CalculatorStemEnv(), p)
    world = ep.reset()
    assert world[0].text == TOOL_HINT and world[0].author == "context"
    r1 = ep.step("V = I*R = calc(2.50*4.00)", token_ids=[9])
    assert not r1.done and [(s.author, s.text) for s in r1.segments] == [("tool", " = 10")]
    r2 = ep.step(" V. Final answer: calc(__import__('os'))")
    assert r2.segments[0].author == "tool" and r2.segments[0].text.startswith(" = error: unknown function")
    r3 = ep.step(". So: Final answer: 10 V.")
    assert r3.done and r3.reward == 1.0
    assert authors(ep.to_stream()) == [
        "context",
        "protocol",
        "context",
        "protocol",
        "agent",
        "tool",
        "agent",
        "tool",
        "agent",
    ]


def test_calculator_correction_demonstrates_the_tool():
    p = generate("test", 1, seed=0)[0]
    for calc_oracle, expect_tool in ((True, True), (False, False)):
        ep = Episode(CalculatorStemEnv(calc_oracle=calc_oracle), p)
        ep.reset()
        ep.step("Final answer: -1")
        tail = authors(ep.to_stream())[authors(ep.to_stream()).index("verifier") :]
        assert tail[:3] == ["verifier", "protocol", "oracle"] and ("tool" in tail) is expect_tool


def test_calculator_call_budget_then_graded():
    env = CalculatorStemEnv(max_calls=1)
    env.reset(P)
    assert not env.step("n = calc(10.0/40.0)").done
    result = env.step(" mol; c = calc(0.25/0.25)")  # over budget: graded as it stands, no tool answer
    assert result.done and [s.author for s in result.segments][:2] == ["verifier", "protocol"]


def scripted(monkeypatch, tok, policy, calls=None):
    """Replace the acting loop's sampler by `policy(prompt text) -> (text, finish reason)`; each
    call's config is appended to `calls`."""

    def fake_sample(model, tok_, prompts, cfg):
        if calls is not None:
            calls.append(cfg)
        out = []
        for prompt_ids in prompts:
            text, finish = policy(tok_.decode(prompt_ids))
            ids = tok_(text, add_special_tokens=False)["input_ids"][: cfg.max_new_tokens]
            out.append(Sample(ids, tok_.decode(ids), finish, len(prompt_ids)))
        return out

    monkeypatch.setattr(rollout_module, "sample", fake_sample)


def test_rollout_with_a_policy_and_jsonl_round_trip(tmp_path, monkeypatch, tok):
    problems = generate("agent", 6, seed=1)

    def policy(prompt_text):
        p = next(p for p in problems if p.question in prompt_text)
        return (p.solution if p.skill != "ph" else "Final answer: 99"), "eos"

    scripted(monkeypatch, tok, policy)
    streams = rollout(None, tok, StemEnv, problems, SamplingConfig(max_new_tokens=256))
    assert [s.id for s in streams] == [p.id for p in problems]
    for stream, p in zip(streams, problems):
        assert stream.meta["reward"] == (0.0 if p.skill == "ph" else 1.0)
    write_streams(tmp_path / "s.jsonl", streams)
    back = list(read_streams(tmp_path / "s.jsonl"))
    assert [s.to_json() for s in back] == [s.to_json() for s in streams]


TWO_VOLTS = Problem(
    "v2", "physics", "ohm_voltage", "2 A through 1 ohm. Voltage?", "Final answer: 2 V.", 2.0, "V", 0.01, 0.0
)


@pytest.mark.parametrize(
    "sampled,kept,marked,answer",
    [
        # emphasis around the marker: the answer line ends the turn, and that line is graded
        ("**Final answer**: 2 V\nThen 7 more words", "**Final answer**: 2 V\n", True, 2.0),
        # a line break inside the marker: no marker, so no cut, and the last number is graded
        ("Final\nanswer: 2 V\nThen 7 more words", "Final\nanswer: 2 V\nThen 7 more words", False, 7.0),
    ],
)
def test_what_is_cut_is_what_is_graded(monkeypatch, tok, sampled, kept, marked, answer):
    """One `Final answer:` rule, the verifier's: the turn is cut at the end of the answer line
    exactly when the verifier reads the answer after a marker."""
    scripted(monkeypatch, tok, lambda prompt: (sampled, "length"))
    [s] = rollout(None, tok, StemEnv, [TWO_VOLTS], SamplingConfig(max_new_tokens=64))
    agent = next(seg for seg in s.segments if seg.author == "agent")
    assert agent.text == kept
    assert agent.token_ids == tok(sampled, add_special_tokens=False)["input_ids"][: len(agent.token_ids)]
    assert s.meta["verdict"]["marked"] is marked and s.meta["verdict"]["answer"] == answer


def test_single_turn_envs_sample_once_with_their_stop_and_seed(monkeypatch, tok):
    """Support and tutor episodes are one line: one sampler call, stopped at the line break, with
    the caller's seed and budget; the agent segment keeps the sampled ids."""
    calls = []
    scripted(monkeypatch, tok, lambda prompt: (" card ending 1234.\n", "stop"), calls)
    spec = env_spec("support", 0)
    items = spec.items("train", 3, 0)
    streams = spec.act(None, tok, items, SamplingConfig(max_new_tokens=24, seed=5), ["a", "b", "c"])
    assert [(c.stop, c.seed, c.max_new_tokens) for c in calls] == [(("\n",), 5, 24)]
    assert [s.id for s in streams] == ["a", "b", "c"]
    for s, task in zip(streams, items):
        [agent] = [seg for seg in s.segments if seg.author == "agent"]
        assert agent.token_ids == tok(" card ending 1234.\n", add_special_tokens=False)["input_ids"]
        assert s.meta["success"] is (task.required == "card") and s.meta["turns"] == 1
    # a sample that runs past the line break is cut after the token that completes it
    scripted(monkeypatch, tok, lambda prompt: ("The capital of Australia is Canberra.\nUser: more", "length"))
    [s] = rollout(None, tok, TutorEnv, [FACTS[0]], SamplingConfig(max_new_tokens=32))
    assert next(seg.text for seg in s.segments if seg.author == "agent") == "The capital of Australia is Canberra.\n"
    assert s.meta["success"] is True


def test_a_turn_paused_at_a_stop_goes_on_and_rounds_are_seeded(monkeypatch, tok):
    """The calculator pauses sampling at every ")": one that closes no call continues the same turn
    (one agent segment, all its ids); a call is answered by the tool; round r draws with seed
    `seed * seed_stride + r`."""
    script = iter([("I = (2.0)", "stop"), (" so V = calc(2*1)", "stop"), (" V. Final answer: 2 V\nmore", "length")])
    calls = []
    scripted(monkeypatch, tok, lambda prompt: next(script), calls)
    [s] = rollout(None, tok, CalculatorStemEnv, [TWO_VOLTS], SamplingConfig(max_new_tokens=64, seed=3), seed_stride=7)
    assert [(c.stop, c.seed) for c in calls] == [((")",), 21), ((")",), 22), ((")",), 23)]
    assert [seg.author for seg in s.segments][-3:] == ["agent", "tool", "agent"]
    first, tool, last = s.segments[-3:]
    assert first.text == "I = (2.0) so V = calc(2*1)" and tool.text == " = 2" and last.text == " V. Final answer: 2 V\n"
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("I = (2.0)", " so V = calc(2*1)")]
    assert first.token_ids == ids[0] + ids[1]
    assert s.meta["correct"] is True and s.meta["calls"] == 1
    # the budget is per turn: after the pause the same turn gets what is left of it
    assert calls[1].max_new_tokens == 64 - len(ids[0]) and calls[2].max_new_tokens == 64


def test_rollout_refuses_mixed_stop_rules_and_misaligned_arguments(tok):
    envs = iter([StemEnv(), CalculatorStemEnv()])
    with pytest.raises(ValueError, match="stop strings"):
        rollout(None, tok, lambda: next(envs), [P, P], SamplingConfig())
    with pytest.raises(ValueError, match="ids has 1 entries for 2 items"):
        rollout(None, tok, StemEnv, [P, P], SamplingConfig(), ids=["x"])
    with pytest.raises(ValueError, match="unknown environment"):
        env_spec("chess", 0)


def test_teacher_stream_is_an_sft_row():
    stream = teacher_stream(P)
    assert authors(stream) == ["protocol", "context", "protocol", "teacher"]
    assert stream.text == prompt(P) + P.solution
    assert stream.segments[0].text == QUESTION_HEADER and stream.segments[2].text == SOLUTION_HEADER


# ---------------------------------------------------------------- the CLI, as a subprocess


def run_cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "dostream.cli", "stem", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_cli_generate_prints_problem_rows():
    out = run_cli("generate", "--split", "test", "--n", "7", "--seed", "3")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 7
    assert [Problem.from_json(r) for r in rows] == generate("test", 7, seed=3)
    assert set(rows[0]) == {"id", "domain", "skill", "question", "solution", "answer", "unit", "rel_tol", "abs_tol"}


def test_cli_generate_default_size_and_bad_arguments():
    out = run_cli("generate", "--split", "test")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 100
    assert run_cli("generate", "--split", "train").returncode == 2
    assert run_cli("generate", "--split", "sft", "--n", "-1").returncode == 2


def test_cli_verify(tmp_path):
    row = P.to_json()
    lines = [
        {"id": "a", "problem": row, "completion": P.solution},
        {"id": "b", "problem": row, "completion": "Final answer: 1000 mM"},
        {"id": "c", "problem": row, "completion": "Final answer: 1.0 mol"},
        {"id": "d", "problem": row, "completion": "no idea"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    out = run_cli("verify", "--input", str(path))
    assert out.returncode == 0, out.stderr
    verdicts = [json.loads(line) for line in out.stdout.splitlines()]
    assert [v["id"] for v in verdicts] == ["a", "b", "c", "d"]
    assert [v["correct"] for v in verdicts] == [True, True, False, False]
    assert set(verdicts[0]) == {"id", "correct", "answer", "unit", "marked", "reason"}
    assert [v["marked"] for v in verdicts] == [True, True, True, False]
    assert verdicts[1]["answer"] == 1000.0 and verdicts[1]["unit"] == "mM"
    assert "wrong unit" in verdicts[2]["reason"] and verdicts[3]["answer"] is None


def test_cli_verify_reports_bad_rows_and_goes_on(tmp_path):
    good = {"id": "ok", "problem": P.to_json(), "completion": P.solution}
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "{not json\n"
        + json.dumps({"id": "x", "problem": {"answer": "one"}, "completion": "1"})
        + "\n"
        + json.dumps(good)
        + "\n",
        encoding="utf-8",
    )
    out = run_cli("verify", "--input", str(path))
    assert out.returncode == 1
    assert f"{path}:1:" in out.stderr and f"{path}:2:" in out.stderr and "answer" in out.stderr
    assert [json.loads(x)["id"] for x in out.stdout.splitlines()] == ["ok"]
    stdin = run_cli("verify", "--input", "-", stdin=json.dumps(good) + "\n")
    assert stdin.returncode == 0 and json.loads(stdin.stdout)["correct"] is True
    assert run_cli("verify", "--input", str(tmp_path / "missing.jsonl")).returncode == 2
