"""Memory the world taught: notes with evidence, distilled from stored streams, retrieved into context.

The causal rule, applied to memory: what the world wrote is evidence, what the agent wrote is not.
A note links to the world-authored spans that support it; the agent's own text can only be the
situation a note is about.

The package in data-flow order: `distill.py` (stored streams → cases → clusters → candidates),
`writer.py` (the model that writes a rule over a cluster, local or an OpenAI-compatible endpoint),
`admit.py` (the world-model test: does the note raise the likelihood of world tokens it was not
written from?), `store.py` (`Memory`: notes, evidence, counters, supersede, forget), `retrieve.py`
(lexical retrieval, and `as_context`: notes into a prompt as one `context` segment),
`consolidate.py` (the memory as a source of the learning cycle: the notes' cited world segments
into the adapter, gated).

The two front doors keep their modules' names and are imported from them (re-exported here they
would hide the modules): `from dostream.memory.distill import distill`,
`from dostream.memory.retrieve import retrieve`.
"""

from __future__ import annotations

from dostream.memory.admit import Admission, Scorer
from dostream.memory.distill import DistillConfig
from dostream.memory.retrieve import Lexical, Retriever, as_context
from dostream.memory.store import EVIDENCE_AUTHORS, Cite, EvidenceError, Memory, Note, Source
from dostream.memory.writer import EndpointWriter, LocalWriter, Writer

__all__ = [
    "EVIDENCE_AUTHORS",
    "Admission",
    "Cite",
    "DistillConfig",
    "EndpointWriter",
    "EvidenceError",
    "Lexical",
    "LocalWriter",
    "Memory",
    "Note",
    "Retriever",
    "Scorer",
    "Source",
    "Writer",
    "as_context",
]
