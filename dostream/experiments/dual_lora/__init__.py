"""The dual-LoRA experiment: the staged run (`run.py`) and its report (`report.py`)."""
