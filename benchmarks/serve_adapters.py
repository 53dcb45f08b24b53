"""`benchmarks/serve.py --adapters`: many tenants' adapters in one batch against one adapter.

    python benchmarks/serve.py --adapters [--tenants 8] [--rank 16] [--clients 32] [--per-client 4]
                               [--max-tokens 32] [--repeat 3] [--duration S] [--warmup-rounds N] [--json OUT]

One `dostream serve` process (the embedded SmolLM2-135M, fp32, its own engine) with `--tenants`
LoRA adapters of rank `--rank` on every linear layer (random A and B, B != 0: each changes what the
model draws), made once into a temporary directory. Each tenant has an API key; the server answers
a key's requests with its tenant's adapter (`Job.adapter`, `Job.adapter_dir`: the batcher's pool,
many adapters in one decode). Arms, run in turn, round by round, the order alternating:

    adapters   `--clients` clients spread over the tenants (client c: tenant c % tenants)
    one        the same clients, every one with tenant 0's adapter
    base       the same clients, no adapter (the model as it is)

Every client sends `--per-client` greedy chat requests back to back (benchmarks/serve.py's prompts),
after one warm-up request per tenant (the adapters loaded). Requests/s, tokens/s, p50/p99 latency per
arm, and the paired ratios per round with their t intervals: adapters/one in requests/s (the
issue's bar: >= 0.75) and in tokens/s (the adapters' answers may differ in length), one/base.

`--duration S`: instead, every client sends requests back to back for S seconds, and the requests
that end within them count (req/s = those / S). With a fixed number each, a run lasts as long as
its slowest client's chain of answers, and the adapters' answers differ in length from tenant to
tenant, so the arm's last steps carry few rows (162 decode steps in every round for 8 adapters
against 130 for one, 19.7 rows a step against 22.2); the window measures the rate while every
client is busy (at c26a5e4 it gave the lower ratio of the two, 0.750x against 0.814x).
The server's decode counters (`GET /metrics`: steps, their seconds, rows, join steps) are recorded
per arm, warm-up included.

`--warmup-rounds N`: N rounds of every arm first, not recorded. A round's one warm-up request per
tenant loads the adapters but makes only that prompt's prefix-cache entries; the other prompts'
entries, per adapter, are made in the first arm that sends them (8 adapters: ~32 entries, each a
forward of its own; one adapter: 8). Without a warm-up round the first round measures that too.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dostream.config import environment

ARMS = ("adapters", "one", "base")


def make_adapters(model: str, tenants: int, rank: int, out: Path) -> list[Path]:
    """`tenants` PEFT LoRA adapters of `model` (all linear layers, rank `rank`), each its own random
    A (PEFT's init) and B (normal, std 0.02: the delta moves the logits), saved under `out`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dostream.models import load_model

    peft = get_peft_model(load_model(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    dirs = []
    for t in range(tenants):
        with torch.no_grad():
            g = torch.Generator().manual_seed(1000 + t)
            for name, p in peft.named_parameters():
                if "lora_A" in name:
                    p.uniform_(-1 / p.shape[1] ** 0.5, 1 / p.shape[1] ** 0.5, generator=g)
                elif "lora_B" in name:
                    p.normal_(0, 0.02, generator=g)
        dirs.append(out / f"tenant-{t}")
        peft.save_pretrained(dirs[-1])
    return dirs


def serve(spec_file: str) -> None:
    """The server process: `dostream serve` as the CLI builds it, each tenant's key answered with
    its adapter (the mapping a tenant registry makes: `Job.adapter`, `Job.adapter_dir`)."""
    import uvicorn

    from dostream.sampling.adapters import AdapterPool
    from dostream.serve.app import ServeConfig, Server

    spec = json.loads(Path(spec_file).read_text())
    cfg = ServeConfig(model=spec["model"], store=spec["store"], port=spec["port"], precision="fp32")
    server = Server(cfg, env_key=spec["key"])
    engine = server.engine
    if engine.adapters is None:  # (a server.py that does not make the pool yet)
        engine.adapters = AdapterPool(max_adapters=cfg.max_adapters, base=server.slot.get())
    by_key = spec["adapters"]  # key id -> [adapter key, directory] (none: the model in force)
    submit = engine.submit

    def submit_as_tenant(job):
        found = by_key.get(job.pending.key)
        if found is not None:
            job.adapter, job.adapter_dir = found
        return submit(job)

    engine.submit = submit_as_tenant
    uvicorn.run(server.app(), host="127.0.0.1", port=spec["port"], log_level="warning")


async def clients_run(url: str, keys: list[str], args, prompts: list[str], warm: list[str]) -> dict:
    """`args.clients` clients, client c with key keys[c % len(keys)], `args.per_client` requests each."""
    latencies: list[float] = []
    tokens, errors = 0, []

    deadline = float("inf")  # --duration: the window's end (set once the warm-up is done)

    async def client(c: int, http: httpx.AsyncClient, key: str, n: int) -> None:
        nonlocal tokens
        r = 0
        while (r < n) if n else time.perf_counter() < deadline:
            body = {
                "model": args.model,
                "messages": [{"role": "user", "content": prompts[(c + r) % len(prompts)]}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
            }
            r += 1
            t = time.perf_counter()
            resp = await http.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            if t + (done := time.perf_counter() - t) > deadline:
                return  # ended after the window: not counted
            latencies.append(done)
            if resp.status_code != 200:
                errors.append(f"{resp.status_code}: {resp.text[:200]}")
                continue
            tokens += resp.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=args.clients + 4)) as http:
        await asyncio.gather(*(client(0, http, k, 1) for k in warm))  # warm-up: every adapter loaded
        latencies.clear()
        tokens = 0
        t0 = time.perf_counter()
        if args.duration:  # every client sends until the window ends: the server's steady rate
            deadline = t0 + args.duration
        n = 0 if args.duration else args.per_client
        await asyncio.gather(*(client(c, http, keys[c % len(keys)], n) for c in range(args.clients)))
        wall = args.duration or time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "n_errors": len(errors),
        "errors": errors[:3],
        "wall_s": wall,
        "req_per_s": len(lat) / wall,
        "tokens_per_s": tokens / wall,
        "tokens_per_request": tokens / max(1, len(lat) - len(errors)),
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
    }


def run(args, prompts: list[str], key: str, free_port, wait_ready, stop, counters=None) -> dict:
    """Make the adapters, start the server, run the arms `args.repeat` rounds; the results.
    `counters(url)`: the server's decode counters (`serve.decode_counters`), read around each arm."""
    from dostream.serve.store import ServeStore

    work = Path(tempfile.mkdtemp(prefix="dostream-bench-adapters-"))
    dirs = make_adapters(args.model, args.tenants, args.rank, work / "adapters")
    store = ServeStore.open_dir(work / "store")
    keys, mapping = [], {}
    for t, d in enumerate(dirs):
        kid, secret = store.add_key(f"tenant-{t}", ("chat",))
        keys.append(secret)
        mapping[kid] = [f"tenant-{t}@v1", str(d)]
    store.close()
    port = free_port()
    spec = work / "spec.json"
    spec.write_text(
        json.dumps({"model": args.model, "store": str(work / "store"), "port": port, "key": key, "adapters": mapping})
    )
    log = work / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(spec)], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    try:
        wait_ready(proc, url + "/v1/models", 300, log)
        arm_keys = {"adapters": keys, "one": keys[:1], "base": [key]}
        for r in range(-args.warmup_rounds, args.repeat):  # (rounds below 0: warming up, not recorded)
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                before = counters(url) if counters else None
                got = asyncio.run(clients_run(url, arm_keys[arm], args, prompts, arm_keys[arm]))
                if counters:  # the warm-up requests included
                    after = counters(url)
                    got["decode"] = {k: after[k] - before[k] for k in after}
                if r >= 0:
                    runs[arm].append({**got, "round": r})
                print(f"{arm}{' (warm-up)' if r < 0 else ''}: {json.dumps(got)}", file=sys.stderr, flush=True)
    finally:
        stop(proc)
    return {"config": _config(args), "runs": runs, **ratios(runs)}


def ratios(runs: dict[str, list[dict]]) -> dict:
    """Paired by round, mean and t interval: adapters/one in req/s (the issue's bar) and tokens/s
    (answers of other lengths), and one/base in req/s (what one unmerged adapter costs)."""
    out = {}
    for name, (num, den, key) in {
        "ratio_req_per_s": ("adapters", "one", "req_per_s"),
        "ratio_tokens_per_s": ("adapters", "one", "tokens_per_s"),
        "ratio_one_base_req_per_s": ("one", "base", "req_per_s"),
    }.items():
        pairs = [n[key] / d[key] for n, d in zip(runs[num], runs[den])]
        out[name] = {"per_round": pairs, **_interval(pairs)}
    return out


def _config(args) -> dict:
    return {
        "model": args.model,
        "dtype": "fp32",
        "tenants": args.tenants,
        "rank": args.rank,
        "targets": "all-linear",
        "clients": args.clients,
        "per_client": args.per_client,
        "duration_s": getattr(args, "duration", 0.0),
        "warmup_rounds": getattr(args, "warmup_rounds", 0),
        "max_tokens": args.max_tokens,
        "repeat": args.repeat,
        "environment": environment(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def _interval(xs: list[float]) -> dict:
    """Mean and 95% t interval (none for one value)."""
    from scipy import stats

    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": mean}
    half = stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / len(xs) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half}


def table(result: dict) -> str:
    lines = [
        "| arm | clients | requests | req/s | tok/s | tok/request | p50 s | p99 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, rows in result["runs"].items():
        mean = {
            k: statistics.fmean(r[k] for r in rows)
            for k in ("req_per_s", "tokens_per_s", "tokens_per_request", "p50_s", "p99_s")
        }
        lines.append(
            f"| {arm} | {result['config']['clients']} | {sum(r['requests'] for r in rows)} | {mean['req_per_s']:.2f} | "
            f"{mean['tokens_per_s']:.1f} | {mean['tokens_per_request']:.1f} | {mean['p50_s']:.2f} | {mean['p99_s']:.2f} |"
        )
    lines.append("")
    for name, what in (
        ("ratio_req_per_s", "adapters / one, req/s"),
        ("ratio_tokens_per_s", "adapters / one, tok/s"),
        ("ratio_one_base_req_per_s", "one / base, req/s"),
    ):
        ratio = result.get(name) or ratios(result["runs"])[name]
        span = f" [{ratio['low']:.3f}, {ratio['high']:.3f}]" if "low" in ratio else ""
        lines.append(f"{what}, paired by round: {ratio['mean']:.3f}{span}")
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2])
