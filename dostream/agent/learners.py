"""Moved: the learners live in `dostream/learning/learners.py`, their names in `dostream/learning/config.py`.

This module keeps the old import path working."""

from dostream.learning.config import (  # noqa: F401
    DEFAULT_GROUP,
    DEFAULT_LEARNERS,
    LEARNER_HELP,
    LEARNERS,
    REWARD_LEARNERS,
    VIEW_LEARNERS,
    WORLD_VIEW,
    check_learner,
    group_size_for,
)
from dostream.learning.learners import Outcome, learn  # noqa: F401
