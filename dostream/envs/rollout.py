"""THE acting loop: a model plays a batch of episodes, every agent turn kept as its exact sampled ids.

`rollout(model, tok, make_env, items, sampling)` plays one `Episode` per item, each in a fresh
environment from `make_env()`, and returns the recorded streams in the order of `items`. It samples
in rounds: one `sampling.sample` call continues every unfinished turn of the batch, conditioned on
its episode so far (`Renderer.prompt_ids`) and the ids its turn already has. Round r draws with seed
`sampling.seed * seed_stride + r` and stops at the environments' `stop` strings.

What the loop reads from an environment is declared by `envs.base.Environment`: `stop`, and
`turn_over(text)`. A sampled piece is cut after the shortest prefix of its ids that completes the
turn (the kept ids are exactly a sampled prefix; what came after is dropped, as if a stop rule had
fired there) and the turn is stepped. A turn that is not over goes on in the next round if it only
paused at a stop string (a `)` that closed no tool call); it is stepped as it stands when the model
sampled EOS or the turn used `sampling.max_new_tokens`. After a step the world answers (a verdict,
a tool's output); an episode that is not done gets its next turn in the next round. A turn sampled
in several rounds is one `agent` segment with all its ids.

>>> streams = rollout(model, tok, StemEnv, problems, SamplingConfig(greedy=True))  # doctest: +SKIP
>>> [s.meta["correct"] for s in streams]                                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from dostream.envs.base import Environment, Episode
from dostream.render import Renderer, decode
from dostream.sampling import SamplingConfig, sample
from dostream.stream import Stream


def rollout(
    model,
    tok,
    make_env: Callable[[], Environment],
    items: list[Any],
    sampling: SamplingConfig,
    *,
    ids: list[str] | None = None,
    replay: list[Stream] | None = None,
    seed_stride: int = 1,
    desc: str = "episodes",
    progress: bool = False,
) -> list[Stream]:
    """One episode per item (pass an item k times for k samples), named `ids` (default: the item's
    id). With `replay`, each episode first replays the agent turns of its stream there (their
    exact ids; the environment answers them again) and the model acts from where they end."""
    from tqdm.auto import tqdm

    for name, given in (("ids", ids), ("replay", replay)):
        if given is not None and len(given) != len(items):
            raise ValueError(f"{name} has {len(given)} entries for {len(items)} items")
    eps = [Episode(make_env(), item, id=None if ids is None else ids[k]) for k, item in enumerate(items)]
    for k, ep in enumerate(eps):
        ep.reset()
        for seg in replay[k].segments if replay is not None else []:
            if seg.author == "agent" and not ep.done:
                ep.step(seg.text, seg.token_ids)
    stops = {tuple(ep.env.stop) for ep in eps}
    if len(stops) > 1:
        raise ValueError(f"the episodes of one batch share their stop strings, not {sorted(stops)}")
    stop = stops.pop() if stops else ()
    renderer = Renderer(tok, add_eos=False)
    pending: list[list[int]] = [[] for _ in eps]  # ids of each episode's unfinished turn
    active = [k for k, ep in enumerate(eps) if not ep.done]
    bar = tqdm(total=len(active), desc=desc, unit="ep", disable=not progress, dynamic_ncols=True, leave=False)
    rnd = 0
    while active:
        # One call per round for every unfinished turn (its max_new_tokens is the largest budget left);
        # a row's ids are then cut to its own budget: a prefix of what it sampled, as a length stop.
        budget = {k: sampling.max_new_tokens - len(pending[k]) for k in active}
        cfg = replace(sampling, stop=stop, max_new_tokens=max(budget.values()), seed=sampling.seed * seed_stride + rnd)
        prompts = [renderer.prompt_ids(eps[k].to_stream()) + pending[k] for k in active]
        still = []
        for k, s in zip(active, sample(model, tok, prompts, cfg)):
            new = s.token_ids[: budget[k]]
            finish = s.finish_reason if len(new) == len(s.token_ids) else "length"
            turn, over = _complete_turn(tok, eps[k].env, pending[k], new)
            if not (over or finish != "stop" or len(turn) >= sampling.max_new_tokens):
                pending[k] = turn  # paused at a stop string that did not end the turn: it goes on
                still.append(k)
                continue
            pending[k] = []
            eps[k].step(decode(tok, turn), turn)
            if eps[k].done:
                bar.update(1)
            else:
                still.append(k)  # the world answered (a tool, a verdict); the episode goes on
        rnd += 1
        active = still
    bar.close()
    return [ep.to_stream() for ep in eps]


def _complete_turn(tok, env: Environment, pending: list[int], new: list[int]) -> tuple[list[int], bool]:
    """The turn's ids up to the shortest sampled prefix that completes it, and whether it is complete.
    Without a complete prefix: all ids, not complete."""
    turn = pending + new
    if not env.turn_over(decode(tok, turn)):
        return turn, False
    # `pending` did not complete the turn (else it would have been stepped), so the end is in `new`.
    for i in range(len(pending) + 1, len(turn)):
        if env.turn_over(decode(tok, turn[:i])):
            return turn[:i], True
    return turn, True
