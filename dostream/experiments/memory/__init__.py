"""The memory experiment (issue 34, item 7): see run.py."""
