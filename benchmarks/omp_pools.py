"""A decode step on the thread that loaded the model, on another thread, and on another thread once
the loader's OpenMP pool is freed (`dostream.openmp.release_pool`).

    python benchmarks/omp_pools.py [--rows 1,32] [--steps 40] [--dtype bf16|fp32] [--json FILE]

GNU OpenMP gives each thread that starts a parallel region a pool of workers of its own. A server
loads its model on one thread and decodes on another; once the two pools' threads outnumber the
CPUs, the runtime counts itself oversubscribed and its waiting threads spin only briefly, so
between two small operations a worker sleeps and the next region waits for its wake-up. Each case
runs in a fresh process (a pool, once made, lasts as long as its thread): it loads the embedded
SmolLM2-135M-Instruct and its `CachedForward` on the main thread, prefills `rows` prompts and times
`--steps` decode steps (`sampling.Decode.step`, greedy), reporting the median step:
* loader: on the main thread, which made the only pool;
* other thread: on a new thread, the main thread's pool still there;
* other thread, pool released: the same after `release_pool()` on the main thread (what
  `dostream serve` does before its sampling thread starts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = ("loader", "other thread", "other thread, pool released")

WORKER = """
import json, statistics, sys, threading, time, torch
from dostream.cached_forward import CachedForward
from dostream.models import load_model, load_tokenizer
from dostream.openmp import release_pool
from dostream.render import Renderer
from dostream.sampling import Decode, SamplingConfig
from dostream.stream import Segment, Stream

case, rows, steps, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tok = load_tokenizer("smollm2")
model = load_model("smollm2", dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
with torch.inference_mode():
    forward = CachedForward.build(model)
questions = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]
renderer = Renderer(tok, chat_template=True)  # as dostream serve renders a chat request
prompts = [renderer.prompt_ids(Stream(str(i), [Segment("user", questions[i % 3], role="user")])) for i in range(rows)]
config = SamplingConfig(max_new_tokens=steps + 2, temperature=0.0)
out = {}

def run():
    d = Decode(model, tok, forward=forward, eos=set())
    d.add(prompts, [(0, j) for j in range(rows)], [config] * rows, list(range(rows)))
    d.step()  # the prefill
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        d.step()
        times.append(time.perf_counter() - t)
    out["step_ms"] = 1e3 * statistics.median(times)

if case == "loader":
    run()
else:
    if case == "other thread, pool released":
        out["released"] = release_pool()
    t = threading.Thread(target=run)
    t.start()
    t.join()
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for case in CASES:
            cmd = [sys.executable, "-c", WORKER, case, str(rows), str(args.steps), args.dtype]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{case}, {rows} rows failed:\n{proc.stderr[-2000:]}")
            r = {"rows": rows, "case": case, **json.loads(proc.stdout.strip().splitlines()[-1])}
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
    threads = env["OMP_NUM_THREADS"]
    print(f"| rows | case | median decode step (ms), {args.dtype}, OMP_NUM_THREADS={threads} |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['case']} | {r['step_ms']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"dtype": args.dtype, "threads": threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
