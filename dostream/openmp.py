"""The OpenMP runtime under PyTorch's CPU build: how its threads wait, and whose pool they are in.

Nothing here imports torch: `openmp_defaults` must be applied before torch loads its OpenMP runtime,
which reads its environment then.

**Waiting.** PyTorch's parallel regions run on GNU OpenMP threads that spin ~300,000 iterations
between regions before they sleep: alone on the machine that saves a wake-up per region, beside any
other busy process it holds a core the other needs (training and sampling ran 8-11x slower beside
one busy process). Measured quiet and contended (benchmarks/omp_wait.py, docs/reference.md "A
shared CPU and OpenMP"), a short spin keeps the quiet speed and 3.4-4.2x of the contended one, so
the `dostream` command sets it before any subcommand loads torch, unless the user chose how
OpenMP's threads wait (theirs stands; a thread count alone is not a choice of waiting).

**Pools.** Each thread that starts a parallel region gets a pool of OpenMP worker threads of its
own, kept until that thread exits. Once the pools' threads outnumber the CPUs, GNU OpenMP counts
itself oversubscribed and a waiting thread spins a few hundred iterations at most, whatever its
spin count, so a worker sleeps between two small operations and each region waits for its
wake-up. A server loads its model on one thread (`serve/server.py`) and decodes on another
(`serve/batcher.py`): two pools of 2 on 2 CPUs. `python benchmarks/omp_pools.py` (bf16): a decode
step of 1 row took 26 ms on the loading thread, 43 ms on another, 28 ms on another once the
loader's pool was freed (32 rows: 48, 66, 46 ms). `release_pool` frees the calling thread's pool
(OpenMP 5's `omp_pause_resource_all(omp_pause_hard)`) once it is done with its parallel work.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping

OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
OPENMP_DEFAULT = {"GOMP_SPINCOUNT": "10000"}


def openmp_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The OpenMP settings the `dostream` command adds to `environ`: `OPENMP_DEFAULT`, or nothing
    when the user set any of `OPENMP_WAIT_VARIABLES`."""
    return {} if any(k in environ for k in OPENMP_WAIT_VARIABLES) else dict(OPENMP_DEFAULT)


_RUNTIME: list[ctypes.CDLL] = []  # once found (not before torch loads it: then looked for again)


def _gnu_openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime this process has loaded (torch's own copy), or None: not loaded yet,
    not GNU's (Intel's, LLVM's), or not Linux."""
    if _RUNTIME:
        return _RUNTIME[0]
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # the library already loaded: the same instance, not a second one
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            _RUNTIME.append(lib)
            return lib
        except (OSError, AttributeError):  # an older runtime without OpenMP 5's pause
            continue
    return None


def release_pool() -> bool:
    """Free the calling thread's OpenMP worker pool (its next parallel region makes a new one), so
    that other threads' pools do not count as oversubscribed. Call it on a thread that is done with
    parallel work, outside any parallel region. Returns whether a GNU OpenMP runtime freed it."""
    lib = _gnu_openmp()
    return lib is not None and lib.omp_pause_resource_all(2) == 0  # 2: omp_pause_hard
