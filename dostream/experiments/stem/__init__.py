"""The seed paper's STEM comparison: the published arms and numbers (`paper.py`), the staged run
(`run.py`) and its report (`report.py`)."""
