"""Sampling: batched generation that returns, for every row, the exact token ids the model sampled.

The sampled ids are where an agent's tokens are born, so provenance is recorded here and never
reconstructed: `Sample.token_ids` are the ids in the order they were drawn, the EOS token
included when the model chose to stop (that decision is part of its action), and
`Sample.text` is their decoding with nothing skipped or cleaned up. `agent_segment(sample)` turns a
sample into the `agent` segment that `Renderer` emits as those same ids (docs/design.md invariant 2).

>>> from dostream.models import load_model, load_tokenizer               # doctest: +SKIP
>>> tok, model = load_tokenizer("smollm2"), load_model("smollm2")       # doctest: +SKIP
>>> prompt = tok("Question:\\n2+2?\\n\\nProposed solution:\\n")["input_ids"]  # doctest: +SKIP
>>> [s] = sample(model, tok, [prompt], SamplingConfig(max_new_tokens=32, stop=("\\n\\n",)))  # doctest: +SKIP
>>> stream.segments.append(agent_segment(s))                            # doctest: +SKIP

Randomness is per row: row `i` draws from its own generator seeded by `(seed, i)`, so a row's
sample depends on its prompt, its index and the seed, not on which prompts share its batch or on
`batch_size` (up to float rounding, which differs between batch shapes).

The package in data-flow order: `config.py` (what to sample, what came back), `generate.py`
(`sample`, the front door), `decoding.py` (`Decode`, the one decode loop), `pick.py` (a token per
row from logits), `prefill.py` (prompts into KV caches), `kvcache.py` (the caches' layouts),
`prefix.py` (`PrefixCache`), `adapters.py` (many LoRA adapters in one batch: `Lora`, `AdapterPool`),
`vllm_backend.py` (the optional vLLM path).
"""

from __future__ import annotations

from dostream.render import decode
from dostream.sampling.config import FinishReason, Sample, SamplingConfig, agent_segment, default_eos
from dostream.sampling.decoding import Decode
from dostream.sampling.generate import generate_for_streams, sample
from dostream.sampling.prefill import cache_kwarg
from dostream.sampling.prefix import PrefixCache

__all__ = [
    "Decode",
    "FinishReason",
    "PrefixCache",
    "Sample",
    "SamplingConfig",
    "agent_segment",
    "cache_kwarg",
    "decode",  # the one decoding rule of sampled ids (render's), imported from here by callers
    "default_eos",
    "generate_for_streams",
    "sample",
]
