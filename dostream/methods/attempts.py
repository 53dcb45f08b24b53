"""A model attempts STEM problems in the environment, many episodes at once, exact token ids kept.

`attempt(model, tok, problems, sampling)` runs one `Episode` per problem through `StemEnv` (or
`CalculatorStemEnv` with `tools="calculator"`) and returns the recorded streams: the prompt, the
agent's sampled turn(s) as `agent` segments with their sampled `token_ids`, then the world's
answer (a `verifier` verdict; after a wrong attempt a fresh "Proposed solution:" header and the
`oracle` correction). `stream.meta["first_correct"]` is the verifier's judgement of the attempt.

The stop rule: an attempt ends when the model samples EOS, or at the end of the line that holds
its `Final answer:` (a line break before any `Final answer:` does not end it), or after
`max_new_tokens` sampled tokens. The answer line is found after sampling and the ids are cut
there: the kept ids are exactly the sampled prefix, what came after is dropped as if a stop rule
had fired. With the calculator, a turn that ends in `calc(<expr>)` pauses for the tool's answer and
the attempt goes on; a turn sampled in several calls (paused at a `)` that was not a tool call) is
one agent segment with all its ids.

>>> streams = attempt(model, tok, problems, SamplingConfig(greedy=True, max_new_tokens=96))  # doctest: +SKIP
>>> sum(s.meta["first_correct"] for s in streams) / len(streams)                             # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import replace

from dostream.envs.base import Episode
from dostream.envs.calculator import CalculatorStemEnv, calc_solution_segments, trailing_call
from dostream.envs.stem import Problem, StemEnv
from dostream.render import Renderer
from dostream.sampling import SamplingConfig, decode, sample
from dostream.stream import Segment, Stream

TOOLS = ("none", "calculator")
_MARKER = re.compile(r"final\s*answer\s*:", re.IGNORECASE)


def make_env(tools: str, attempts: int = 1) -> StemEnv:
    """The paper's STEM episode: a correct attempt gets "Verdict: correct.", a wrong one the
    verdict and (after the last attempt) the oracle correction."""
    assert tools in TOOLS, f"tools is one of {TOOLS}, not {tools!r}"
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
    from tqdm.auto import tqdm

    renderer = Renderer(tok, add_eos=False)
    n_attempts = 2 if replay is not None else 1
    eps = [
        Episode(make_env(tools, n_attempts), p, id=(ids[i] if ids else f"{p.id}#{i}")) for i, p in enumerate(problems)
    ]
    for k, ep in enumerate(eps):
        ep.reset()
        for seg in replay[k].segments if replay is not None else []:
            if seg.author == "agent" and not ep.done:
                ep.step(seg.text, seg.token_ids)
    pending: list[list[int]] = [[] for _ in eps]  # ids of the agent's unfinished turn
    active = [k for k, ep in enumerate(eps) if not ep.done]
    # A ")" may close a tool call: the sampler pauses there. The end of the answer line is found
    # after sampling (`_cut_after_answer`): a stop string cannot say "a line break after the marker".
    stops = (")",) if tools == "calculator" else ()
    bar = tqdm(
        total=len(active), desc=desc or "attempts", unit="ep", disable=not progress, dynamic_ncols=True, leave=False
    )
    rnd = 0
    while active:
        # One call per round for every unfinished turn (its max_new_tokens is the largest budget left);
        # a row's ids are then cut to its own budget: a prefix of what it sampled, as a length stop.
        budget = {k: sampling.max_new_tokens - len(pending[k]) for k in active}
        cfg = replace(sampling, stop=stops, max_new_tokens=max(budget.values()), seed=sampling.seed * 7919 + rnd)
        prompts = [renderer.prompt_ids(eps[k].to_stream()) + pending[k] for k in active]
        still = []
        for k, s in zip(active, sample(model, tok, prompts, cfg)):
            new, finish = s.token_ids[: budget[k]], s.finish_reason
            if len(new) < len(s.token_ids):
                finish = "length"
            before = eps[k].env.attempt_text  # earlier pieces of this attempt (around tool calls)
            turn, answered = _cut_after_answer(tok, pending[k], new, before)
            text = decode(tok, turn)
            call = tools == "calculator" and not answered and trailing_call(text) is not None
            if not (answered or call or finish != "stop" or len(turn) >= sampling.max_new_tokens):
                pending[k] = turn  # paused at a ")" that is not a tool call: the turn goes on
                still.append(k)
                continue
            pending[k] = []
            eps[k].step(text, turn)
            if eps[k].done:
                bar.update(1)
            else:
                still.append(k)  # the tool answered; the attempt goes on
        rnd += 1
        active = still
    bar.close()
    return [ep.to_stream() for ep in eps]


def _cut_after_answer(tok, pending: list[int], new: list[int], before: str) -> tuple[list[int], bool]:
    """The turn's ids up to the token that completes the line break after `Final answer:` (the
    sampled prefix, exactly; what the model drew after its answer line is discarded, as if a
    stop rule had fired there), and whether that line ended. Without such a line: all ids."""
    turn = pending + new
    text = decode(tok, turn)
    marker = _MARKER.search(before + text)
    if marker is None:
        return turn, False
    full = before + text
    start = len(full) - len(full[marker.end() :].lstrip())  # the answer itself may start on the next line
    newline = full.find("\n", start) - len(before) if start < len(full) else -1
    if newline < 0:
        return turn, False
    for i in range(len(pending) + 1, len(turn) + 1):  # the shortest prefix that holds the line break
        if len(decode(tok, turn[:i])) > newline and decode(tok, turn[:i])[newline] == "\n":
            return turn[:i], True
    return turn, False


def accuracy_by_skill(streams: list[Stream], key: str = "correct") -> dict[str, list[int]]:
    """skill -> [correct, total]."""
    out: dict[str, list[int]] = {}
    for s in streams:
        c = out.setdefault(s.meta["skill"], [0, 0])
        c[0] += bool(s.meta[key])
        c[1] += 1
    return dict(sorted(out.items()))
