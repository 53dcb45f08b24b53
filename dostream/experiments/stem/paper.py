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
