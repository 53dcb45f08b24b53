"""`dostream.openmp.release_pool`: the calling thread's OpenMP workers go, and parallel work after it
still runs (and is right); called before torch loads the runtime, it frees nothing and a later
call still finds it."""

import os
import subprocess
import sys

import pytest

CODE = """
import os, time
from dostream.openmp import release_pool

early = release_pool()  # before torch loads its OpenMP runtime: nothing to free, and nothing remembered
import torch

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
gnu = any("libgomp" in line.rsplit("/", 1)[-1] for line in open("/proc/self/maps"))
print(gnu, early, freed, before - after, ok)
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
    gnu, early, freed, gone, ok = out.stdout.split()
    if gnu == "False":
        pytest.skip("this torch build does not run GNU OpenMP")
    assert freed == "True"
    assert early == "False"  # called before torch loaded the runtime, it did not stop the later call
    assert (gone, ok) == ("1", "True")  # the one worker of a 2-thread pool exited
