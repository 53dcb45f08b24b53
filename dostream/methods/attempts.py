"""A model attempts STEM problems: the STEM method's side of acting (its episode, its solution rows).

`attempt(model, tok, problems, sampling)` plays one episode per problem through the acting loop
(`envs.rollout`) in `StemEnv` (or `CalculatorStemEnv` with `tools="calculator"`) and returns the
recorded streams: the prompt, the agent's sampled turn(s) as `agent` segments with their sampled
`token_ids`, then the world's answer (a `verifier` verdict; after a wrong attempt a fresh "Proposed
solution:" header and the `oracle` correction). `stream.meta["first_correct"]` is the verifier's
judgement of the attempt.

The stop rule is the environment's (`StemEnv.turn_over`, the verifier's `Final answer:` rule): an
attempt ends when the model samples EOS, or at the end of the line that holds its `Final answer:`
(a line break before the answer does not end it), or after `max_new_tokens` sampled tokens; the
ids are cut there, exactly a sampled prefix. With the calculator, a turn that ends in
`calc(<expr>)` pauses for the tool's answer and the attempt goes on.

>>> streams = attempt(model, tok, problems, SamplingConfig(greedy=True, max_new_tokens=96))  # doctest: +SKIP
>>> sum(s.meta["first_correct"] for s in streams) / len(streams)                             # doctest: +SKIP
"""

from __future__ import annotations

from dostream.envs.calculator import CalculatorStemEnv, calc_solution_segments
from dostream.envs.rollout import rollout
from dostream.envs.stem import SEED_STRIDE, Problem, StemEnv
from dostream.sampling import SamplingConfig
from dostream.stream import Segment, Stream

TOOLS = ("none", "calculator")


def make_env(tools: str, attempts: int = 1) -> StemEnv:
    """The paper's STEM episode: a correct attempt gets "Verdict: correct.", a wrong one the
    verdict and (after the last attempt) the oracle correction."""
    if tools not in TOOLS:
        raise ValueError(f"tools is one of {TOOLS}, not {tools!r}")
    if tools == "calculator":
        return CalculatorStemEnv(announce_correct=True, attempts=attempts)
    return StemEnv(announce_correct=True, attempts=attempts)


def prompt_segments(problem: Problem, tools: str) -> list[Segment]:
    """What the world shows before the first attempt (with the calculator: the tool hint too)."""
    return make_env(tools).reset(problem)


def solution_segments(problem: Problem, tools: str, author: str) -> list[Segment]:
    """The worked oracle solution as `author` segments; with the calculator it demonstrates the
    tool (its outputs are `tool` segments between the solution's pieces)."""
    if tools == "calculator":
        return calc_solution_segments(problem.solution, author)
    return [Segment(author, problem.solution, role="assistant")]


def solution_stream(problem: Problem, tools: str, author: str, id: str | None = None) -> Stream:
    """A direct row x -> y*: the prompt, then the solution written by `author` (teacher, oracle)."""
    return Stream(
        id or problem.id,
        prompt_segments(problem, tools) + solution_segments(problem, tools, author),
        {"skill": problem.skill, "problem_id": problem.id},
    )


def until_verdict(stream: Stream) -> Stream:
    """The attempt part of an episode: everything before the first verifier segment."""
    cut = next((i for i, s in enumerate(stream.segments) if s.author == "verifier"), len(stream.segments))
    return Stream(stream.id, stream.segments[:cut], dict(stream.meta))


def attempt(
    model,
    tok,
    problems: list[Problem],
    sampling: SamplingConfig,
    *,
    tools: str = "none",
    replay: list[Stream] | None = None,
    ids: list[str] | None = None,
    desc: str | None = None,
    progress: bool = True,
) -> list[Stream]:
    """One attempt per problem (pass a problem k times for k samples). With `replay`, each episode
    first replays that stream's agent turns (exact ids; the environment answers them again) and
    the model makes a second attempt after the verdict: the stream-matched repair evaluation."""
    n_attempts = 2 if replay is not None else 1
    return rollout(
        model,
        tok,
        lambda: make_env(tools, n_attempts),
        problems,
        sampling,
        ids=ids or [f"{p.id}#{i}" for i, p in enumerate(problems)],
        replay=replay,
        seed_stride=SEED_STRIDE,
        desc=desc or "attempts",
        progress=progress,
    )


def accuracy_by_skill(streams: list[Stream], key: str = "correct") -> dict[str, list[int]]:
    """skill -> [correct, total]."""
    out: dict[str, list[int]] = {}
    for s in streams:
        c = out.setdefault(s.meta["skill"], [0, 0])
        c[0] += bool(s.meta[key])
        c[1] += 1
    return dict(sorted(out.items()))
