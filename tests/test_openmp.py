"""`dostream.openmp.release_pool`: the calling thread's OpenMP workers go, and parallel work after it
still runs (and is right)."""

import os
import subprocess
import sys

import pytest

CODE = """
import os, time, torch
from dostream.openmp import release_pool

def workers():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(2)
x = torch.randn(1 << 22)
x.sum()  # a parallel region: this thread's pool, one worker beside it
before = workers()
freed = release_pool()
deadline = time.monotonic() + 5
while workers() >= before and time.monotonic() < deadline:  # a worker takes a moment to exit
    time.sleep(0.01)
after = workers()
ok = torch.allclose((x * 2).sum(), x.sum() * 2)  # a new pool, the same results
print(freed, before - after, ok)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP and /proc: Linux")
def test_release_pool_frees_the_calling_threads_workers():
    out = subprocess.run(
        [sys.executable, "-c", CODE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    freed, gone, ok = out.stdout.split()
    if freed == "False":
        pytest.skip("this torch build does not run GNU OpenMP with OpenMP 5's pause")
    assert (gone, ok) == ("1", "True")  # the one worker of a 2-thread pool exited
