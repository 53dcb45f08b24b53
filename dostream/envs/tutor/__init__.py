"""The tutoring environment of the delusion experiment: the fact table (`facts.py`) and the dialogues,
probes and episode (`env.py`)."""
