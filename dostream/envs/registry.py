"""The environments by name: how to draw each one's items, make its episodes and act in it.

>>> spec = env_spec("support", seed=0)                                          # doctest: +SKIP
>>> streams = spec.act(model, tok, spec.items("train", 8, 0), sampling, ids)  # doctest: +SKIP
>>> [s.meta["success"] for s in streams]                                       # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dostream.envs.base import Environment
from dostream.envs.rollout import rollout
from dostream.sampling import SamplingConfig
from dostream.stream import Stream

ENVS = ("support", "support-framed", "stem", "tutor", "discount", "airline")


@dataclass
class EnvSpec:
    """An environment by name: items per split, a fresh environment per episode, how to act in it."""

    items: Callable[[str, int, int], list]  # (split: train|heldout|control, n, seed) -> items
    make_env: Callable[[], Environment]
    max_new_tokens: int  # tokens per agent turn, by default
    describe: dict[str, Any]  # for the report (e.g. the support world's rules)
    success: str = "success"  # the episode's meta key that says it succeeded
    seed_stride: int = 1  # round r of a batch samples with seed `seed * seed_stride + r` (`rollout`)

    def act(self, model, tok, items: list, sampling: SamplingConfig, ids: list[str]) -> list[Stream]:
        """One episode per item through the acting loop; each stream's `meta["success"]` says whether it succeeded."""
        streams = rollout(model, tok, self.make_env, items, sampling, ids=ids, seed_stride=self.seed_stride)
        for s in streams:
            s.meta["success"] = bool(s.meta[self.success])
        return streams


def env_spec(name: str, seed: int) -> EnvSpec:
    """The environment `name` (one of `ENVS`); `seed` draws its world where it has one (support)."""
    if name in ("support", "support-framed"):
        from dostream.envs.support import SupportEnv, SupportWorld

        world = SupportWorld(seed)
        reply = "framed" if name == "support-framed" else "refusal"
        split = {"train": "train", "heldout": "heldout", "control": "heldout"}
        salt = {"train": 0, "heldout": 0, "control": 1}  # control items differ from the evaluation's
        return EnvSpec(
            lambda s, n, sd: world.tasks(split[s], n, sd * 2 + salt[s]),
            lambda: SupportEnv(world, reply),
            24,
            {"rules": world.rules(), "held_out_goals": world.held_out, "reply": reply},
        )
    if name == "tutor":
        from dostream.envs.tutor.env import HELD_OUT_FACTS, TRAIN_FACTS, TutorEnv

        def items(split: str, n: int, sd: int) -> list:
            pool = TRAIN_FACTS if split == "train" else HELD_OUT_FACTS
            rng = random.Random(f"tutor-items:{split}:{sd}")
            return [rng.choice(pool) for _ in range(n)]

        return EnvSpec(items, TutorEnv, 32, {})
    if name == "stem":
        from dostream.envs.stem import SEED_STRIDE, StemEnv, generate

        def items(split: str, n: int, sd: int) -> list:
            pool = generate("agent" if split == "train" else "test", 200 if split == "train" else 100, seed=sd)
            rng = random.Random(f"stem-items:{split}:{sd}")
            return [rng.choice(pool) for _ in range(n)]

        # One attempt, verdict announced: the episode of the STEM methods without tools.
        return EnvSpec(
            items, lambda: StemEnv(announce_correct=True), 128, {}, success="first_correct", seed_stride=SEED_STRIDE
        )
    if name == "discount":  # the seed's three cases; held-out customers need the rule (envs/discount.py)
        from dostream.envs import discount

        return EnvSpec(discount.items, discount.DiscountEnv, 12, {"qualify": ["veterans", "physicians"]})
    if name == "airline":  # tau2-bench's airline policy, withheld; the world cites its lines (envs/airline.py)
        from dostream.envs import airline

        return EnvSpec(airline.items, airline.AirlineEnv, 12, {"policy": "tau2-bench airline policy.md (MIT)"})
    raise ValueError(f"unknown environment {name!r} (expected one of {', '.join(ENVS)})")
