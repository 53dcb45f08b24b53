"""The seed paper's STEM comparison as published: its arms, their labels and its numbers (Figure 4 and
§2.5 of the paper), which the run and the report set beside what dostream measures.
"""

METHODS = ("base", "sft1", "rest", "grpo", "dapo", "oracle_sft", "observational", "interventional")
LABELS = {
    "base": "Base",
    "sft1": "SFT (SFT-1)",
    "rest": "SFT + ReST",
    "grpo": "SFT + GRPO",
    "dapo": "SFT + DAPO",
    "oracle_sft": "SFT + oracle corrections",
    "observational": "Observational stream",
    "interventional": "Interventional stream",
}
PAPER = {
    "base": 0.42,
    "sft1": 0.63,
    "rest": 0.84,
    "grpo": 0.75,
    "dapo": None,
    "oracle_sft": 0.81,
    "observational": 0.61,
    "interventional": 0.85,
}
PAPER_REPAIR = {"interventional": 0.5946, "oracle_sft": 0.4865, "n": 37}
REPAIR_ARMS = ("sft1", "oracle_sft", "observational", "interventional")

# The evaluation protocols (docs/stem_results.md, "Evaluation protocols"). The paper's interventional
# and oracle rows add up as `paper` does (docs/reference.md §2): 63 + 0.5946 × 37 = 85.0.
PROTOCOLS = {
    "single": "every arm answers once, from the plain prompt",
    "paper": "SFT-1's first attempt, kept when the verifier passes it; on a wrong verdict the interventional "
    "and observational arms repair with SFT-1's wrong attempt and the verdict in context, SFT + oracle "
    "corrections answers again from the plain prompt; every other arm answers once",
    "retry": "every arm answers from the plain prompt and, on a wrong verdict, once more with its own wrong "
    "attempt and the verdict in context (an equal test-time budget)",
}
# Under `paper`, the arms that start from SFT-1's first attempt and how each makes its second one:
# `repair` (SFT-1's wrong attempt and the verdict in context) or `plain` (the plain prompt again).
PAPER_SECOND = {"interventional": "repair", "observational": "repair", "oracle_sft": "plain"}
# The paper's comparisons whose direction the report checks under each protocol (the paper's own
# direction is the sign of its numbers above); the first three are the key pairs of issue #17.
CLAIMS = (
    ("interventional", "observational"),
    ("interventional", "oracle_sft"),
    ("interventional", "rest"),
    ("sft1", "base"),
    ("oracle_sft", "sft1"),
    ("interventional", "sft1"),
    ("oracle_sft", "observational"),
    ("rest", "grpo"),
)
KEY_PAIRS = CLAIMS[:3]
