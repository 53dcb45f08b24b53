"""What to sample and what came back (`SamplingConfig`, `Sample`, `agent_segment`): plain data,
knowing nothing of the decode loop, its caches or its backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dostream.config import check_config, keeps_old_names, opt
from dostream.device import SAMPLING_PRECISIONS
from dostream.stream import Segment

FinishReason = Literal["eos", "stop", "length", "cancelled"]


@keeps_old_names  # `dtype=` / `--dtype`: the old name of `precision`
@dataclass
class SamplingConfig:
    """How to sample. `SamplingConfig(greedy=True)` is deterministic argmax decoding (evaluation)."""

    temperature: float = opt(1.0, "softmax temperature; 0 means greedy", min=0)
    top_p: float = opt(
        1.0, "nucleus sampling: draw from the most likely tokens that together hold this mass", gt=0, max=1
    )
    max_new_tokens: int = opt(256, "new tokens per row, the EOS token included", min=1)
    stop: tuple[str, ...] = opt((), "stop strings: a row ends after the token that completes one (kept whole)")
    seed: int = opt(
        0, "random seed: row i draws from a generator seeded by (seed, i); same seed and config, same samples"
    )
    greedy: bool = opt(False, "argmax decoding (temperature, top-p and seed are ignored)")
    # Rows are sorted by length first; 64 beat 32 by ~15% on 2 CPU cores.
    batch_size: int = opt(64, "rows decoded together", min=1)
    precision: str = opt(
        "auto",
        "precision to sample in: fp32, bf16 or fp16 (a cast copy where the model's weights differ), or auto: "
        "fp32 weights in bf16 where a bf16 matmul measures faster here (device.resolve_precision), "
        "bf16/fp16 weights as they are",
        choices=SAMPLING_PRECISIONS,
    )
    # None: the tokenizer's EOS ids and the generation config's; (): none.
    eos_token_ids: tuple[int, ...] | None = opt(None, "token ids that end a row")
    backend: str = opt(
        "auto",
        "auto (vLLM for a model on a CUDA GPU when vllm is installed, else torch), torch or vllm",
        choices=("auto", "torch", "vllm"),
    )
    fast_step: bool = opt(
        True, "Llama-family models decode with cached_forward.CachedForward (off: the model's forward)"
    )
    # The model's own distribution (vLLM's default logprobs_mode="raw_logprobs"), not the one a
    # token was drawn from: a learner's ratios need that one, from temperature and top_p.
    logprobs: int | None = opt(
        None,
        "None: no log-probs (nothing computed); k: each drawn token's log-prob and the k most likely "
        "alternatives (k <= 20), from log_softmax of the model's raw logits in float32, before temperature, "
        "top-p and any prefix constraint, in the forward that drew it",
        min=0,
        max=20,
    )

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        check_config(self)  # the bounds and choices of the fields above, naming the field
        if not all(self.stop):
            raise ValueError(f"stop: stop strings must be non-empty, got {self.stop!r}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass
class Sample:
    """One sampled continuation: exactly what the model drew, ready to be an `agent` segment."""

    token_ids: list[int]  # the sampled ids in order, EOS included if sampled
    text: str  # tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    finish_reason: (
        FinishReason  # "eos": sampled an EOS id; "stop": completed a stop string; "length": hit max_new_tokens;
        # "cancelled": its caller ended it (`Decode.cancel`: a session's answer interrupted)
    )
    prompt_len: int  # number of prompt tokens the row was conditioned on
    # With `SamplingConfig.logprobs` set, per drawn token (None without): its log-prob under the model's raw
    # distribution (log_softmax of the logits, before temperature, top-p and constraints), and the k most
    # likely (id, logprob) there, most likely first.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # Every id was drawn under this grammar's mask (`Decode.add(grammars=)`: its `Grammar.kind`,
    # "json_schema", "tool_calls", ...); None: no grammar. The ids are still the model's choices.
    grammar: str | None = None


def agent_segment(sample: Sample, **kwargs) -> Segment:
    """The `agent` segment for a sample: its text and its exact sampled ids (`kwargs` go to
    `Segment`, e.g. `role=` or `meta=`)."""
    return Segment("agent", sample.text, token_ids=list(sample.token_ids), **kwargs)


def default_eos(model, tokenizer) -> set[int]:
    """The ids that end a row unless a config names its own: the tokenizer's EOS and the generation config's."""
    eos = set()
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos.update([gen] if isinstance(gen, int) else (gen or []))
    return eos
