"""How OpenMP's waiting threads cost dostream on a shared CPU: training and sampling, quiet and
beside one busy process, under each wait setting.

    python benchmarks/omp_wait.py [--json FILE] [--steps 12] [--settings default,passive,spin-10k,one-thread]

PyTorch's CPU build runs its parallel regions on GNU OpenMP threads that, between regions, spin
for a while before they sleep (`GOMP_SPINCOUNT`, 300,000 iterations unless set; `OMP_WAIT_POLICY`
ACTIVE spins for much longer, PASSIVE not at all). Alone on the machine, spinning saves the wake-up
at every region; beside another busy process, a spinning thread holds a core the other process
needs and a sleeping one waits for the core to come back, and every region ends at a barrier that
waits for the slowest thread.

Each setting runs in fresh processes (the runtime reads its environment when it loads), on the
embedded SmolLM2-135M-Instruct:
* train: `dostream.train` steps, LoRA r=16, batch 8 stream rows (benchmarks/throughput.py's);
  tokens/s over the steps after the first;
* sample: `dostream.sampling.sample` of 16 prompts x 32 new tokens (bench_sampling.py's), the second
  of two calls; tokens/s;
each alone ("quiet") and while another process keeps one core busy ("contended": a pure-Python
loop, as a test runner or a tokenizer would). The settings:
* default: nothing set (what PyTorch does unless told; the `dostream` command then sets its own
  default, spin-10k, so for `dostream serve` in benchmarks/serve.py "default" is spin-10k);
* passive: `OMP_WAIT_POLICY=PASSIVE`;
* spin-10k: `GOMP_SPINCOUNT=10000` (spin briefly, then sleep);
* one-thread: `OMP_NUM_THREADS=1`.
The contender is started before each measured process and killed after it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dostream.openmp import OPENMP_WAIT_VARIABLES

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin-10k": {"GOMP_SPINCOUNT": "10000"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}
# What a setting controls: how the threads wait, and how many there are.
OPENMP_VARIABLES = (*OPENMP_WAIT_VARIABLES, "OMP_NUM_THREADS")
BUSY = "while True:\n    pass\n"


def worker(workload: str, steps: int) -> dict:
    """One measurement in this process (its OpenMP settings are the environment's)."""
    sys.path.insert(0, str(HERE))
    import torch

    if workload == "train":
        from throughput import bench_dostream, stream_rows

        from dostream.models import load_tokenizer

        tok = load_tokenizer("smollm2")
        rows = stream_rows(tok, 8 * steps)
        result = bench_dostream(rows, batch_size=8, steps=steps, bf16=False)
        return {"tokens_per_s": result["tokens_per_s"], "threads": torch.get_num_threads()}
    from bench_sampling import _time_ours, bench_prompts

    from dostream.models import load_model, load_tokenizer

    tok, model = load_tokenizer("smollm2"), load_model("smollm2")
    prompts = bench_prompts(16)
    _time_ours(model, tok, prompts, 32)  # warm-up
    seconds, tokens = _time_ours(model, tok, prompts, 32)
    return {"tokens_per_s": tokens / seconds, "threads": torch.get_num_threads()}


def measure(workload: str, setting: str, contended: bool, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    env.update(SETTINGS[setting])
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if contended else None
    try:
        if busy is not None:
            time.sleep(1.0)  # let it take its core
        cmd = [sys.executable, __file__, "--worker", workload, "--steps", str(steps)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--steps", type=int, default=12, help="training steps per measurement")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--workloads", default="train,sample")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return 0
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        ap.error(f"--settings: unknown {unknown}; known: {', '.join(SETTINGS)}")
    results = []
    for workload in args.workloads.split(","):
        for setting in settings:
            for contended in (False, True):
                r = measure(workload, setting, contended, args.steps)
                row = {"workload": workload, "setting": setting, "contended": contended, **r}
                results.append(row)
                print(
                    f"{workload:6} {setting:10} {'contended' if contended else 'quiet':9} "
                    f"{r['tokens_per_s']:8.1f} tokens/s ({r['threads']} threads)",
                    flush=True,
                )
    print("\nworkload  setting     quiet  contended  (tokens/s; contended/quiet)")
    for workload in args.workloads.split(","):
        for setting in settings:
            q, c = (
                next(r["tokens_per_s"] for r in results if (r["workload"], r["setting"], r["contended"]) == key)
                for key in ((workload, setting, False), (workload, setting, True))
            )
            print(f"{workload:9} {setting:10} {q:7.1f} {c:9.1f}  ({c / q:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
