"""Where a run computes and in what precision: the one device policy and the one precision
vocabulary of `train()`, GRPO, sampling, the agent's learners and the server.

A GPU when there is one, else the CPU. Precision is named one way everywhere (`PRECISIONS`):
`fp32`, `bf16`, or `auto`, which `resolve_precision` turns into bf16 where a bf16 matmul runs
faster than fp32 here (`bf16_faster`: a CUDA GPU with bf16, yes; a CPU, measured, not assumed) and
fp32 elsewhere. With only AVX2, bf16 is emulated and runs ~170x slower than fp32: auto is fp32
there, and forcing bf16 warns.

>>> resolve_precision("fp32", "cpu"), device_policy("fp32").bf16
('fp32', False)
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass

import torch

# The precisions a run can be asked for; sampling also takes fp16 (`SAMPLING_PRECISIONS`).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
SAMPLING_PRECISIONS: tuple[str, ...] = (*PRECISIONS, "fp16")
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The deprecated spelling of the training configs' `bf16` field and `--bf16` flag (config.RENAMED_FIELDS).
BF16_SWITCH = {"on": "bf16", "off": "fp32", "auto": "auto"}


@functools.cache
def bf16_speedup(device_type: str) -> float:
    """How much faster a bf16 matmul runs than an fp32 one here (measured once per process, under
    a second on a CPU): CUDA gives inf where the GPU supports bf16, else 0. CPUs differ: with AMX (or
    on some AMD EPYC) ~2.3x; an Intel Xeon with AVX512-BF16 but no AMX measured 0.5-0.8x; a CPU
    with only AVX2 emulates bf16 at ~1 GFLOP/s against ~178 in fp32 (~0.006x)."""
    if device_type == "cuda":
        return math.inf if torch.cuda.is_bf16_supported() else 0.0
    if device_type != "cpu":
        return 0.0

    def seconds(dtype: torch.dtype, repeats: int) -> float:
        a = torch.randn(512, 512, dtype=dtype)
        a @ a
        t = time.perf_counter()
        for _ in range(repeats):
            a @ a
        return (time.perf_counter() - t) / repeats

    fp32 = seconds(torch.float32, 8)
    once = fp32 / seconds(torch.bfloat16, 1)
    # Emulated bf16 is ~100x slower: one matmul tells (8 would take ~2 s of it on an AVX2 CPU).
    return once if once < BF16_EMULATED else fp32 / seconds(torch.bfloat16, 8)


def bf16_faster(device_type: str) -> bool:
    """Does `auto` mean bf16 here? When a bf16 matmul measures at least 1.2x faster than fp32
    (`bf16_speedup`); bf16 would only slow a run down below that."""
    return bf16_speedup(device_type) >= 1.2


# Below this, bf16 is emulated: forcing it warns, and the benchmarks skip it (and say so).
BF16_EMULATED = 0.25


def resolve_precision(name: str, device_type: str) -> str:
    """The precision `name` (one of `SAMPLING_PRECISIONS`) means on `device_type` ("cpu", "cuda"):
    `auto` is "bf16" where `bf16_faster` says so, else "fp32"; the others are themselves. Forcing
    bf16 on a CPU that emulates it warns (the run will be many times slower than in fp32).

    >>> resolve_precision("bf16", "cuda")
    'bf16'
    """
    if name not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(SAMPLING_PRECISIONS)}, not {name!r}")
    if name == "auto":
        return "bf16" if bf16_faster(device_type) else "fp32"
    if name == "bf16" and device_type == "cpu" and bf16_speedup("cpu") < BF16_EMULATED:
        warnings.warn(
            f"bf16 forced on a CPU where a bf16 matmul runs at {bf16_speedup('cpu'):.3f}x fp32 (emulated): "
            "expect a run many times slower than in fp32 (precision auto picks fp32 here)",
            stacklevel=3,
        )
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a resolved precision: `torch_dtype("bf16")` is `torch.bfloat16`."""
    if name not in _TORCH_DTYPES:
        raise ValueError(f"no torch dtype for precision {name!r}: resolve it first (resolve_precision)")
    return _TORCH_DTYPES[name]


@dataclass(frozen=True)
class DevicePolicy:
    """Where a run computes and in what precision: the one policy of `train()` and GRPO."""

    device: torch.device  # a GPU when there is one, else the CPU
    bf16: bool  # autocast forwards to bf16


def device_policy(precision: str = "auto") -> DevicePolicy:
    """The run's device (CUDA when available, else the CPU) and its precision (`PRECISIONS`,
    through `resolve_precision`), applied per forward by `autocast`. The old spellings of `--bf16`
    (on, off) are taken too."""
    precision = BF16_SWITCH.get(precision, precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return DevicePolicy(device, resolve_precision(precision, device.type) == "bf16")


def autocast(device: torch.device | str, bf16: bool):
    """A forward's precision on `device`: bf16 autocast when `bf16`, else float32 (a no-op)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
