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
