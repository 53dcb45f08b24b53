"""What one turn of the learning cycle does: the learners by name and `UpdateConfig`. Knows no source of streams.

`UpdateConfig` is a config block (like `config.SupervisedBlock`, which it extends): the agent's
`AgentConfig` and the server's `LearnConfig` compose it by subclassing, so an update is configured
the same way wherever it runs, DAPO's knobs included, and its flags and run record stay flat.
"""

from __future__ import annotations

from dataclasses import dataclass

from dostream.config import SupervisedBlock, like, opt

LEARNERS = ("interventional", "observational", "none", "dapo", "dual", "dual-shared")
DEFAULT_LEARNERS = ("interventional", "observational", "none")
REWARD_LEARNERS = ("dapo", "dual", "dual-shared")  # act in groups of K samples of one item
VIEW_LEARNERS = ("interventional", "observational")  # one view through `train()`
UPDATE_LEARNERS = tuple(x for x in LEARNERS if x != "none")  # the learners that update
WORLD_VIEW = "interventional"  # what the world model of dual/dual-shared is trained on
DEFAULT_GROUP = 4  # K, where a run has a reward learner and --group-size is left at 0
LEARNER_HELP = {
    "none": "no learning: acts and evaluates only",
    "interventional": "NLL on the world-written tokens (the interventional view)",
    "observational": "NLL on every token but the context, the agent's own included",
    "dapo": "reward only: DAPO on the agent's tokens, K samples of one item per group",
    "dual": "one rank-R adapter: DAPO trains ranks 1..R/2, the world NLL ranks R/2+1..R, each only its own",
    "dual-shared": "the dual learner's two losses on one rank-R adapter, without isolation",
}


def learner_help(names: tuple[str, ...] = LEARNERS) -> str:
    return "what updates learn: " + "; ".join(f"{k} ({LEARNER_HELP[k]})" for k in names)


def group_size_for(learners: list[str] | tuple[str, ...], group_size: int = 0) -> int:
    """The run's K: `group_size` where given (> 0), else DEFAULT_GROUP if a learner of the run
    learns from reward, else 1. Every loop of a run uses the same K, so all act the same sequence."""
    if group_size > 0:
        return group_size
    return DEFAULT_GROUP if any(learner in REWARD_LEARNERS for learner in learners) else 1


def check_learner(learner: str, group_size: int, update_every: int) -> None:
    if learner not in LEARNERS:
        raise ValueError(f"unknown learner {learner!r} (expected one of {', '.join(LEARNERS)})")
    if group_size < 1:
        raise ValueError("group_size must be >= 1 once resolved")
    if learner in REWARD_LEARNERS and group_size < 2:
        raise ValueError(f"the {learner} learner compares K >= 2 samples of one item: set group_size >= 2")
    if update_every % group_size:
        raise ValueError(f"update_every ({update_every}) must be a multiple of group_size ({group_size})")


@dataclass
class UpdateConfig(SupervisedBlock):
    """An update: learner, LoRA and optimiser, replay, gate, DAPO

    One turn of the learning cycle (`learning/cycle.py`): what the learner trains and on how much
    replay, how the gate judges the candidate, and the reward learners' DAPO settings. The LoRA,
    optimiser and batch fields are `SupervisedBlock`'s (constant lr, a fresh AdamW per update)."""

    learner: str = opt("interventional", learner_help(), choices=LEARNERS)
    replay: float = opt(
        1.0, "older streams replayed per new one in an NLL update (drawn uniformly from the store)", min=0.0
    )
    gate_tolerance: float = opt(
        0.1, "reject a candidate whose gate success is more than this below the adapter in force", min=0.0
    )
    gate_learned: int = opt(8, "things the agent already did well that the gate asks again", min=0)
    epochs: int = like(SupervisedBlock, "epochs", 2)
    max_length: int = like(SupervisedBlock, "max_length", 512)
    dual_rank: int = opt(
        64,
        "rank R of the dual learners' adapter: ranks 1..R/2 the policy, R/2+1..R the world model (scale lora_alpha/lora_r)",
        min=2,
    )
    policy_iterations: int = opt(4, "DAPO: optimisation passes over an update's groups (μ)", min=1)
    clip_low: float = opt(0.2, "DAPO: ε_low, the ratio is clipped below at 1 - ε_low", gt=0.0, max=1.0)
    clip_high: float = opt(0.28, "DAPO: ε_high (clip-higher), the ratio is clipped above at 1 + ε_high", gt=0.0)
    kl_beta: float = opt(0.0, "DAPO: weight of a k3 KL penalty to the base model (DAPO drops it: 0)", min=0.0)
    overlong_buffer: int = opt(
        6, "DAPO: soft overlong punishment, a turn within this many tokens of its budget loses up to 1 (0: off)", min=0
    )
    seed: int = opt(0, "seed of the replay draws and the updates")


@dataclass
class Update(UpdateConfig):
    """One update as the learners read it: the config plus what its caller knows."""

    model: str = opt("smollm2", "the base model the adapters belong to")
    group_size: int = opt(1, "K: the samples of one item a reward group holds", min=1)
