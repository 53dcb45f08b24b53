"""dostream: one interaction stream, one rule per token — who wrote this?

World-written tokens are evidence and are supervised; tokens the agent itself sampled are
interventions: kept in the context, masked out of the loss.
"""

__version__ = "0.1.0"

import warnings

# PEFT (0.21) reads `model.is_gradient_checkpointing`, which transformers 5.x deprecates with a
# FutureWarning on every adapter load; nothing a dostream user can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
