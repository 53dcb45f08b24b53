"""The STEM episode: each problem framed as the paper's listing does: `protocol` "Question:\\n", the
question (`context` or `user`), `protocol` "\\n\\nProposed solution:\\n", then the agent's attempt. A wrong
attempt is followed by a `verifier` verdict and an `oracle` correction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dostream.envs.base import StepResult
from dostream.envs.stem.problems import Problem, as_problem
from dostream.envs.stem.verifier import answer_line_ended, verify
from dostream.stream import Segment, Stream

QUESTION_HEADER = "Question:\n"
SOLUTION_HEADER = "\n\nProposed solution:\n"
RETRY_HEADER = "Proposed solution:\n"
VERDICT_CORRECT = "\nVerdict: correct.\n"
VERDICT_INCORRECT = "\nVerdict: incorrect.\n"
# STEM acting samples round r of a batch (`envs.rollout`) with seed `seed * SEED_STRIDE + r`: a prime,
# so the rounds of nearby seeds never share a seed. Changing it changes every STEM result.
SEED_STRIDE = 7919


def prompt(problem: Problem | Mapping[str, Any]) -> str:
    """The paper's plain evaluation prompt: `Question:\\n<question>\\n\\nProposed solution:\\n`."""
    return QUESTION_HEADER + as_problem(problem).question + SOLUTION_HEADER


def prompt_segments(problem: Problem, question_author: str = "context") -> list[Segment]:
    return [
        Segment("protocol", QUESTION_HEADER),
        Segment(question_author, problem.question, role="user"),
        Segment("protocol", SOLUTION_HEADER),
    ]


def teacher_stream(
    problem: Problem | Mapping[str, Any], *, question_author: str = "context", author: str = "teacher"
) -> Stream:
    """An SFT row as a stream: the prompt, then the oracle solution as a world-written demonstration."""
    p = as_problem(problem)
    segments = prompt_segments(p, question_author) + [Segment(author, p.solution, role="assistant")]
    return Stream(p.id, segments, {"skill": p.skill, "domain": p.domain})


class StemEnv:
    """One STEM problem per episode, graded by `verify`.

    `reset(problem)` gives the prompt segments. Each `step(attempt)` is graded: a correct attempt
    ends the episode with reward 1 (and a `verifier` "correct" segment if `announce_correct`);
    a wrong one gets a `verifier` verdict, and after the last of `attempts` tries the `oracle`
    correction under a fresh "Proposed solution:" header, reward 0. `question_author` is who wrote
    the question: `context` (given, never predicted) or `user` (world-written, supervised).

    A turn is over at the end of the line that holds its `Final answer:` (`turn_over`), or when the
    model stops: the verifier's own rule (`answer_line_ended`), so what is cut is what is graded.
    """

    stop: tuple[str, ...] = ()  # no stop string: the answer line's end is found by `turn_over`

    def __init__(self, *, question_author: str = "context", attempts: int = 1, announce_correct: bool = False):
        if question_author not in ("context", "user"):
            raise ValueError(f"question_author is 'context' or 'user', not {question_author!r}")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.question_author, self.attempts, self.announce_correct = question_author, attempts, announce_correct
        self.problem: Problem | None = None
        # The attempt's earlier pieces (a variant with tools steps an attempt in several turns).
        self.attempt, self._attempt_text, self.done = 0, "", False

    def reset(self, item: Problem | Mapping[str, Any]) -> list[Segment]:
        self.problem = as_problem(item)
        self.attempt, self._attempt_text, self.done = 0, "", False
        return prompt_segments(self.problem, self.question_author)

    def info(self) -> dict[str, Any]:
        p = self.problem
        return {"problem_id": p.id, "skill": p.skill, "domain": p.domain}

    def correction(self) -> list[Segment]:
        return [Segment("oracle", self.problem.solution, role="assistant")]

    def turn_over(self, text: str) -> bool:
        """The line holding the attempt's answer has ended (earlier pieces of the attempt included)."""
        return answer_line_ended(self._attempt_text + text)

    def step(self, agent_text: str, token_ids: list[int] | None = None) -> StepResult:
        if self.problem is None or self.done:
            raise RuntimeError("step() needs a running episode: call reset(problem) first")
        verdict = verify(self.problem, self._attempt_text + agent_text)
        self.attempt, self._attempt_text = self.attempt + 1, ""
        info = {**self.info(), "attempt": self.attempt, "correct": verdict.correct, "verdict": verdict.to_json()}
        if self.attempt == 1:
            info["first_correct"] = verdict.correct
        if verdict.correct:
            self.done = True
            segments = [Segment("verifier", VERDICT_CORRECT, role="user")] if self.announce_correct else []
            return StepResult(segments, 1.0, True, info)
        segments = [Segment("verifier", VERDICT_INCORRECT, role="user"), Segment("protocol", RETRY_HEADER)]
        self.done = self.attempt >= self.attempts
        return StepResult(segments + (self.correction() if self.done else []), 0.0, self.done, info)
