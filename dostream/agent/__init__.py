"""The continual agent: acting loop and learners (`loop.py`), the SQLite store (`store.py`), the rule
probe (`probe.py`) and the report (`report.py`)."""
