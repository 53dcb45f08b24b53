"""Where a run computes and in what precision: the one device policy of `train()`, GRPO, the
agent's learners and the server.

A GPU when there is one, else the CPU; bf16 autocast where it pays. On a CPU that is measured, not
assumed (`bf16_speedup`): with only AVX2, bf16 is emulated and runs ~170x slower than fp32.

>>> device_policy("off").bf16
False
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass

import torch


@functools.cache
def bf16_speedup(device_type: str) -> float:
    """How much faster a bf16 matmul runs than an fp32 one here (measured once per process, about
    0.1 s on a CPU): CUDA gives inf where the GPU supports bf16, else 0. CPUs differ: with AMX (or
    on some AMD EPYC) ~2.3x; an Intel Xeon with AVX512-BF16 but no AMX measured 0.5-0.8x; a CPU
    with only AVX2 emulates bf16 at ~1 GFLOP/s against ~178 in fp32 (~0.006x)."""
    if device_type == "cuda":
        return math.inf if torch.cuda.is_bf16_supported() else 0.0
    if device_type != "cpu":
        return 0.0

    def rate(dtype: torch.dtype) -> float:
        a = torch.randn(512, 512, dtype=dtype)
        a @ a
        t = time.perf_counter()
        for _ in range(8):
            a @ a
        return 8 / (time.perf_counter() - t)

    fp32 = rate(torch.float32)
    return rate(torch.bfloat16) / fp32


def bf16_faster(device_type: str) -> bool:
    """Should `bf16="auto"` autocast to bf16 here? When a bf16 matmul measures at least 1.2x
    faster than fp32 (`bf16_speedup`); autocast would only slow training down below that."""
    return bf16_speedup(device_type) >= 1.2


# Below this, bf16 is emulated: forcing it warns, and the benchmarks skip it (and say so).
BF16_EMULATED = 0.25


@dataclass(frozen=True)
class DevicePolicy:
    """Where a run computes and in what precision: the one policy of `train()` and GRPO."""

    device: torch.device  # a GPU when there is one, else the CPU
    bf16: bool  # autocast forwards to bf16


def device_policy(bf16: str = "auto") -> DevicePolicy:
    """The run's device (CUDA when available, else the CPU) and its precision: `bf16` "on", "off",
    or "auto" (on where `bf16_faster` says so), applied per forward by `autocast`."""
    if bf16 not in ("auto", "on", "off"):
        raise ValueError(f"bf16 must be auto, on or off, not {bf16!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if bf16 == "on" and device.type == "cpu" and bf16_speedup("cpu") < BF16_EMULATED:
        warnings.warn(
            f"bf16 forced on a CPU where a bf16 matmul runs at {bf16_speedup('cpu'):.3f}x fp32 (emulated): "
            "expect a run many times slower than in fp32 (--bf16 auto picks fp32 here)",
            stacklevel=2,
        )
    return DevicePolicy(device, bf16 == "on" or (bf16 == "auto" and bf16_faster(device.type)))


def autocast(device: torch.device | str, bf16: bool):
    """A forward's precision on `device`: bf16 autocast when `bf16`, else float32 (a no-op)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
