"""The tutoring fact bank: 132 atomic facts in 12 fields, written for dostream.

Each entry is `(field, topic, template, true value, false value)`. The claim is the template with
the value filled in, so the true and the false claim share every word but the answer, and the
false value is a near miss (the second-largest, the neighbouring year, the famous contemporary),
not an absurdity. A `*` inside a value marks where its *key* starts (a second `*` where it ends):
the words a follow-up must contain to count as stating that value (a surname for a person:
"Isaac *Newton" is written "Isaac Newton" and recognised by "Newton"). Without a `*` the whole
value is the key.

The list order is fixed: the held-out split (`tutor.HELD_OUT_FACTS`) is every fourth entry. The
entries live in two modules of six fields each, `natural.py` then `human.py`, in that order.
"""

from dostream.envs.tutor.facts.human import HUMAN
from dostream.envs.tutor.facts.natural import NATURAL

FACT_TABLE: tuple[tuple[str, str, str, str, str], ...] = NATURAL + HUMAN
