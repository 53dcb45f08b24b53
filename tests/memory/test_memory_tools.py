"""Tools as memory (`dostream/memory/tools.py`): a procedure that worked becomes a callable tool only
once the environment has executed it and the world said it works; its outputs are `tool`-authored.

On the support environment a tool is the call that got a service to act: the agent's line (the
detail it had ready) with the user's values as slots, made again by the environment."""

from __future__ import annotations

import random

import pytest

from dostream.envs.base import Episode
from dostream.envs.support import ITEMS, SupportEnv, SupportWorld, procedure_of
from dostream.memory.store import Cite, EvidenceError, Memory
from dostream.memory.tools import Tooled, count_calls, learn, propose, tool, tools, verify
from dostream.render import Renderer

WORLD = SupportWorld(0)
NAME = "support:0"  # the environment (and world) the tools are learned under


def say(task, kind: str) -> str:
    return f" {ITEMS[kind].phrase.format(task.details[kind])}.\n"


def call(name: str) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>'


def play(env, task, policy):
    """One scripted episode: the policy reads the world's opening segments and writes one turn."""
    ep = Episode(env, task)
    opening = ep.reset()
    ep.step(policy(opening, task))
    return ep.to_stream()


def guesser(seed: int):
    """Calls an offered tool when the episode opens with one, else names a detail at random."""
    rng = random.Random(seed)

    def policy(opening, task):
        offered = opening[0].meta.get("tools") if opening[0].author == "context" else None
        if offered:
            return call(offered[0]["function"]["name"])
        return say(task, rng.choice(sorted(ITEMS)))

    return policy


def tasks_to(service: str, n: int, seed: int = 5, split: str = "train"):
    return [t for t in WORLD.tasks(split, 400, seed=seed) if t.service == service][:n]


def succeeded(task, mem):
    """A successful call to `task`'s service, learned into `mem` as a candidate tool."""
    stream = play(SupportEnv(WORLD), task, lambda _, t: say(t, t.required))
    assert stream.meta["success"]
    [tid] = learn(mem, NAME, [stream], procedure_of)
    return tid, stream


def test_a_candidate_is_not_callable_before_it_passes_verification():
    mem = Memory(":memory:")
    task = WORLD.tasks("train", 1, seed=0)[0]
    tid, stream = succeeded(task, mem)
    t = tool(mem, tid)
    assert (t.status, t.callable, t.name) == ("candidate", False, "call_summit_health")
    assert t.procedure == {"service": "Summit Health", "line": " date of birth {birth}."}
    # its evidence is the world's verdict only; the agent's line is its situation
    assert [x.author for x in t.evidence] == ["environment"] and "checks out" in t.evidence[0].quote
    assert [x.author for x in t.situation] == ["agent"]
    with pytest.raises(EvidenceError, match="author 'agent' cannot be evidence"):
        propose(mem, NAME, "x", {"service": "S", "line": "y"}, "d", evidence=[Cite(stream, 2)])

    # not offered, and calling it by name runs nothing: the turn is the text it is, the service refuses
    later = tasks_to("Summit Health", 1)[0]
    env = Tooled(SupportEnv(WORLD), mem, NAME)
    s = play(env, later, lambda *_: call(t.name))
    assert s.segments[0].text.startswith("You phone") and "tools" not in s.segments[0].meta
    assert "tool" not in {x.author for x in s.segments} and not s.meta["success"]
    assert "memory_tool" not in s.meta

    verify(mem, tid, lambda: SupportEnv(WORLD), tasks_to("Summit Health", 5, seed=9))
    s = play(Tooled(SupportEnv(WORLD), mem, NAME), later, lambda *_: call(t.name))
    assert s.segments[0].meta["memory_tools"] == [tid] and s.meta["success"] and s.meta["memory_tool"] == tid


def test_a_verification_failure_refuses_the_tool():
    mem = Memory(":memory:")
    tid, _ = succeeded(WORLD.tasks("train", 1, seed=0)[0], mem)
    # the same service in another world wants another detail: executed there, the procedure fails
    other = next(seed for seed in range(1, 50) if SupportWorld(seed).requires["Summit Health"] != "birth")
    elsewhere = SupportWorld(other)
    t = verify(mem, tid, lambda: SupportEnv(elsewhere), elsewhere.tasks("train", 200, seed=1))
    assert (t.status, t.callable) == ("refused", False)
    runs = t.verification["runs"]
    assert len(runs) == 3 and not any(r["success"] for r in runs) and t.verification["passed"] == 0
    assert all(r["world"].startswith("I can't help without") for r in runs)  # the world's words, recorded
    assert all(r["tool"].startswith(" date of birth ") for r in runs)  # what the tool said
    assert tools(mem, NAME, "verified") == []
    s = play(Tooled(SupportEnv(WORLD), mem, NAME), tasks_to("Summit Health", 1)[0], lambda *_: call(t.name))
    assert "tool" not in {x.author for x in s.segments}
    with pytest.raises(ValueError, match="only an active candidate"):
        verify(mem, tid, lambda: SupportEnv(WORLD), WORLD.tasks("train", 200, seed=1))

    # too few runs it applies to is no verification either
    tid2, _ = succeeded(tasks_to("Bluebird Bank", 1)[0], mem)
    t2 = verify(mem, tid2, lambda: SupportEnv(WORLD), tasks_to("Bluebird Bank", 2, seed=9), runs=3)
    assert t2.status == "refused" and len(t2.verification["runs"]) == 2


def test_a_verified_tool_is_offered_and_run_by_the_environment_its_outputs_tool_authored(tok):
    mem = Memory(":memory:")
    tid, _ = succeeded(WORLD.tasks("train", 1, seed=0)[0], mem)
    assert verify(mem, tid, lambda: SupportEnv(WORLD), tasks_to("Summit Health", 5, seed=9)).callable
    task = tasks_to("Summit Health", 1, seed=3, split="heldout")[0]  # a request never made before
    env = Tooled(SupportEnv(WORLD), mem, NAME)
    s = play(env, task, lambda *_: " " + call("call_summit_health") + "\n")
    assert [x.author for x in s.segments] == [
        "context",
        "context",
        "protocol",
        "agent",
        "tool",
        "protocol",
        "environment",
    ]
    offered = s.segments[0]
    assert offered.meta["tools"][0]["function"]["name"] == "call_summit_health" and "<tools>" in offered.text
    assert s.segments[4].text == f" date of birth {task.details['birth']}." and s.segments[4].role == "tool"
    assert s.segments[6].text.startswith("Thank you, the date of birth checks out") and s.meta["success"]
    # another service's episode is not offered it
    assert "tools" not in play(env, tasks_to("Bluebird Bank", 1)[0], lambda *_: " hello\n").segments[0].meta

    # the tool's output is evidence like any tool's: supervised, citable; the call stays masked
    r = Renderer(tok, add_eos=False).render(s)
    sup = r.supervised("interventional")
    assert any(ok and a == "tool" for ok, a in zip(sup, r.authors))
    assert not any(ok and a in ("agent", "context") for ok, a in zip(sup, r.authors))
    mem.add(s.segments[4].text, "extractive", evidence=[Cite(s, 4)])
    # a reuse is not a new procedure
    assert learn(mem, NAME, [s], procedure_of) == []
    count_calls(mem, [s])
    assert {k: v for k, v in tool(mem, tid).counters.items() if k in ("used", "helped")} == {"used": 1, "helped": 1}


def test_turns_that_call_a_tool_end_where_the_call_closes():
    env = Tooled(SupportEnv(WORLD), Memory(":memory:"), NAME)
    assert env.stop == ("\n", "</tool_call>")
    assert not env.turn_over(' <tool_call>{"name": "call_x",\n')
    assert env.turn_over(' <tool_call>{"name": "call_x", "arguments": {}}</tool_call>')
    assert env.turn_over(" card ending 4821.\n") and not env.turn_over(" card ending")
    assert env.turn_over(" card ending 4821.\n<tool_call>")  # the line ended before the call opened


def test_support_learns_a_tool_from_successful_calls_and_reuses_it_later(tmp_path):
    """A scripted agent that guesses; the calls that went through become candidates; each is
    verified on fresh calls; later calls, to requests never made, use the tools."""
    mem = Memory.open_dir(tmp_path / "memory")
    act = guesser(0)
    first = [play(Tooled(SupportEnv(WORLD), mem, NAME), t, act) for t in WORLD.tasks("train", 48, seed=0)]
    assert not any(s.segments[0].meta.get("tools") for s in first)  # nothing learned yet: nothing offered
    learned = learn(mem, NAME, first, procedure_of)
    assert learned and all(tool(mem, t).status == "candidate" for t in learned)
    for t in learned:
        verify(mem, t, lambda: SupportEnv(WORLD), WORLD.tasks("train", 400, seed=1))
    known = {tool(mem, t).procedure["service"]: tool(mem, t) for t in learned}
    assert all(t.callable for t in known.values())
    assert all(
        t.procedure["line"] == f" {ITEMS[WORLD.requires[svc]].phrase.format('{' + WORLD.requires[svc] + '}')}."
        for svc, t in known.items()
    )

    later = [play(Tooled(SupportEnv(WORLD), mem, NAME), t, act) for t in WORLD.tasks("heldout", 24, seed=0)]
    reused = [s for s in later if s.meta.get("memory_tool") is not None]
    assert reused and all(s.meta["success"] for s in reused)
    assert all(s.meta["service"] in known for s in reused)
    assert all(any(x.author == "tool" for x in s.segments) for s in reused)
    first_rate = sum(s.meta["success"] for s in first) / len(first)
    assert sum(s.meta["success"] for s in later) / len(later) > first_rate
    count_calls(mem, later)
    assert sum(tool(mem, t).counters["helped"] for t in learned) == len(reused)
    mem.close()

    # read-only, the tools are there; forgetting the episode a tool was written from forgets it
    ro = Memory.open_dir(tmp_path / "memory", read_only=True)
    assert {t.id for t in tools(ro, NAME, "verified")} == set(learned)
    ro.close()
    mem = Memory.open_dir(tmp_path / "memory")
    gone = tool(mem, learned[0])
    written = next(x.stream for x in gone.evidence)
    assert learned[0] in mem.forget(stream=written)
    assert learned[0] not in {t.id for t in tools(mem)} and mem.note(learned[0]).text == ""
    svc = gone.procedure["service"]
    task = next(t for t in WORLD.tasks("heldout", 100, seed=4) if t.service == svc)
    assert "tools" not in play(Tooled(SupportEnv(WORLD), mem, NAME), task, act).segments[0].meta


def test_the_acting_loop_plays_episodes_offered_a_tool(tok):
    """Through `rollout` with the tiny model: the tool list renders, the turn rule holds."""
    from dostream.envs.rollout import rollout
    from dostream.models import tiny_model
    from dostream.sampling import SamplingConfig

    mem = Memory(":memory:")
    tid, _ = succeeded(WORLD.tasks("train", 1, seed=0)[0], mem)
    verify(mem, tid, lambda: SupportEnv(WORLD), tasks_to("Summit Health", 5, seed=9))
    items = tasks_to("Summit Health", 2, seed=3, split="heldout")
    streams = rollout(
        tiny_model(0), tok, lambda: Tooled(SupportEnv(WORLD), mem, NAME), items, SamplingConfig(max_new_tokens=6)
    )
    assert all(s.segments[0].meta["memory_tools"] == [tid] and s.meta["done"] for s in streams)
    assert all([x.author for x in s.segments].count("agent") == 1 for s in streams)
