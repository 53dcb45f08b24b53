"""dostream: one interaction stream, one rule per token — who wrote this?

World-written tokens are evidence and are supervised; tokens the agent itself sampled are
interventions: kept in the context, masked out of the loss.
"""

__version__ = "0.1.0"
