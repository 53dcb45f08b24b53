"""Log-probabilities of chosen tokens: how every part of dostream scores a sequence.

A model scores the tokens marked in a boolean `score` mask ([batch, length], the shape of
`input_ids`); every other token is context. Position 0 is never scored: nothing precedes it.

* `logits_at` runs the decoder on every position but the vocabulary projection only at the
  positions that predict a scored token (in a stream or a prompt most tokens are context, and
  their logits are never computed);
* `target_logprobs` turns such logits into the log-probability of each target token, in float32;
* `logprobs_at` is the two together.

The training loss (`train.SupervisedNLL`: the same log-probs, summed by the fused cross-entropy),
GRPO's policy and reference log-probs, the delusion probe's Δ and the agent's rule probe all score here.
"""

from __future__ import annotations

import torch
from torch import nn

# Config fields of models that transform logits after the head; those take the full forward.
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale")


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The decoder and the vocabulary projection to run apart, or None: run the whole model."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    if head is None or not hasattr(core, "get_decoder"):
        return None
    if any(getattr(getattr(core, "config", None), k, None) for k in _AFTER_HEAD):
        return None
    return core.get_decoder(), head


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, score: torch.Tensor):
    """The logits that predict each scored token: row k predicts `input_ids[:, 1:][score[:, 1:]][k]`
    (scored tokens in row-major order). Column 0 of `score` is ignored.

    A PEFT model runs with its adapter (unless disabled by the caller); autocast is the caller's."""
    at = score[:, 1:]
    parts = _decoder_and_head(model)
    if parts is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][at]
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head(hidden[:, :-1][at])


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, computed in float32: [N, vocab], [N] -> [N]."""
    return logits.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def logprobs_at(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, score: torch.Tensor
) -> torch.Tensor:
    """log p(token | the tokens before it) of every scored token, flattened row by row.

    >>> from dostream.models import tiny_model                                 # doctest: +SKIP
    >>> ids = torch.tensor([[5, 17, 300, 9]])                                  # doctest: +SKIP
    >>> logprobs_at(tiny_model(), ids, torch.ones_like(ids), ids > 100)        # doctest: +SKIP
    tensor([-10.8726], grad_fn=<SelectBackward0>)
    """
    return target_logprobs(logits_at(model, input_ids, attention_mask, score), input_ids[:, 1:][score[:, 1:]])
