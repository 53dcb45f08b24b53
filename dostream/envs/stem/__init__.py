"""The STEM environment of the seed paper, in data-flow order: `problems.py` (the generated exercises
and their oracle solutions), `verifier.py` (the strict numeric grader), `env.py` (the episode).

>>> p = generate("sft", 1, seed=3)[0]
>>> verify(p, p.solution).correct
True
"""

from dostream.envs.stem.env import (
    QUESTION_HEADER,
    RETRY_HEADER,
    SEED_STRIDE,
    SOLUTION_HEADER,
    VERDICT_CORRECT,
    VERDICT_INCORRECT,
    StemEnv,
    prompt,
    prompt_segments,
    teacher_stream,
)
from dostream.envs.stem.problems import (
    DOMAINS,
    SKILLS,
    SPLIT_SIZES,
    SPLITS,
    TOLERANCES,
    Problem,
    as_problem,
    generate,
    make_problem,
    split_of,
)
from dostream.envs.stem.verifier import FINAL_ANSWER, Verdict, answer_line_ended, unit_registry, verify

__all__ = [
    "DOMAINS",
    "SKILLS",
    "SPLITS",
    "SPLIT_SIZES",
    "TOLERANCES",
    "Problem",
    "as_problem",
    "generate",
    "make_problem",
    "split_of",
    "FINAL_ANSWER",
    "Verdict",
    "answer_line_ended",
    "unit_registry",
    "verify",
    "QUESTION_HEADER",
    "SOLUTION_HEADER",
    "RETRY_HEADER",
    "SEED_STRIDE",
    "VERDICT_CORRECT",
    "VERDICT_INCORRECT",
    "StemEnv",
    "prompt",
    "prompt_segments",
    "teacher_stream",
]
