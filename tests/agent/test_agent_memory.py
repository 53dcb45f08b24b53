"""`dostream agent run --memory`: episodes open with the memory's notes as `context` (recorded as
the model saw them, masked in every view), and the episodes are distilled into the memory after
each acting block, resumably."""

from __future__ import annotations

import json

from dostream.agent.loop import AgentConfig, run
from dostream.agent.store import Store
from dostream.memory.store import Cite, Memory
from dostream.render import Renderer
from dostream.stream import Segment, Stream

CFG = dict(env="support", model="tiny", update_every=4, learner="none", eval_n=2, eval_every=8, gate_control=2)


def test_episodes_open_with_the_notes_and_are_distilled_resumably(tmp_path, tok):
    world = Stream("told-1", [Segment("user", "For customer services, have the account number ready.")])
    mem = Memory.open_dir(tmp_path / "memory")
    note = mem.add("Have the account number ready for customer services.", "extractive", evidence=[Cite(world, 0)])
    mem.close()
    run(AgentConfig(**CFG, episodes=4, memory=True, progress=False), tmp_path, tok=tok)
    store = Store(tmp_path / "store.sqlite", read_only=True)
    episodes = store.episodes(0, 4)
    store.close()
    for ep in episodes:
        first = ep.segments[0]
        assert first.author == "context" and first.meta["memory_notes"] == [note], ep.segments[:2]
        r = Renderer(tok, add_eos=False).render(ep)
        for view in ("interventional", "observational"):
            assert not any(s and a == "context" for s, a in zip(r.supervised(view), r.authors))
    assert json.loads((tmp_path / "memory" / "agent-distilled.json").read_text()) == {"episodes": 4}
    mem = Memory.open_dir(tmp_path / "memory", read_only=True)
    assert mem.note(note).counters["used"] == 4  # each acting episode that saw it (evaluations do not count)
    mem.close()
    run(AgentConfig(**CFG, episodes=8, memory=True, progress=False), tmp_path, resume=True, tok=tok)
    assert json.loads((tmp_path / "memory" / "agent-distilled.json").read_text()) == {"episodes": 8}


def test_support_episodes_are_offered_the_verified_tools_of_their_service(tmp_path, tok):
    """A verified tool (taught by one scripted successful call) is offered to the agent's episodes
    on calls to its service and to no other; a candidate (not verified) never is."""
    from dostream.envs.base import Episode
    from dostream.envs.support import ITEMS, SupportEnv, SupportWorld, procedure_of
    from dostream.memory.tools import learn, verify

    world = SupportWorld(0)
    mem = Memory.open_dir(tmp_path / "memory")
    tasks = world.tasks("train", 400, seed=3)
    ids = {}
    for service in ("Atlas Mobile", "Summit Health"):  # both among the run's first 8 calls
        task = next(t for t in tasks if t.service == service)
        ep = Episode(SupportEnv(world), task)
        ep.reset()
        ep.step(f" {ITEMS[task.required].phrase.format(task.details[task.required])}.\n")
        [ids[service]] = learn(mem, "support:0", [ep.to_stream()], procedure_of)
    atlas = [t for t in tasks if t.service == "Atlas Mobile"]
    assert verify(mem, ids["Atlas Mobile"], lambda: SupportEnv(world), atlas).callable  # Summit Health: a candidate
    mem.close()
    run(AgentConfig(**CFG, episodes=8, memory=True, progress=False), tmp_path, tok=tok)
    store = Store(tmp_path / "store.sqlite", read_only=True)
    episodes = store.episodes(0, 8)
    store.close()
    offered = {
        ep.id: [m for s in ep.segments if s.author == "context" for m in s.meta.get("memory_tools", [])]
        for ep in episodes
    }
    calls = {ep.id: ep.segments[0].text for ep in episodes}
    for eid, tids in offered.items():
        assert tids == ([ids["Atlas Mobile"]] if "Atlas Mobile" in calls[eid] else []), (eid, tids)
    assert any(offered.values())
