"""The served agent learns while it serves: held-out success over time, `dostream serve --learn`
beside a server without it, on the same calls, through the public API only.

    python benchmarks/serve_learn.py [--model smollm2] [--calls 192] [--wave 8] [--eval-every 32]
        [--heldout 24] [--control 8] [--learner interventional] [--update-every-tokens 1500]
        [--learn-threads 1] [--sync] [--out runs/serve-learn]

A scripted client plays the support environment (`dostream/envs/support.py`) against each server
over HTTP: a call is one conversation, the user's details and the task as the system message, the
service's question as the user message; the model's one-line answer is judged by the service's
rule and the service's reply (the refusal that names what it needs, or its thanks) comes back as
feedback from the `environment`, with reward 1 or 0. Calls go in waves of `--wave` concurrent
conversations, the same calls (tasks, seeds, temperature 0.7) for both servers. Every
`--eval-every` calls, and at the end, the client asks the held-out calls (goals no training call
asks, `--heldout` of them) greedily and without feedback: held-out success over time. The
learning server updates on its own every `--update-every-tokens` new supervised tokens (`--sync`:
the client also asks for an update, `POST /v1/learn`, before each evaluation, which makes the
curve independent of timing); its gate asks `--control` control calls (held-out services' rules,
written as a control file) and the calls it already answered well. Serving latency of the
training calls is reported while an update ran and while none did.

Writes OUT/results.json (every number), OUT/curve.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dostream.envs.support import ITEMS, SupportEnv, SupportWorld, prompt_segments

KEY = "sk-serve-learn"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(task) -> list[dict]:
    system = prompt_segments(task)[0].text.strip()
    ask = f"{task.service} here. Which one of the user's details do you have ready? Answer in one line."
    return [{"role": "system", "content": system}, {"role": "user", "content": ask}]


def control_file(world: SupportWorld, n: int, seed: int, path: Path) -> None:
    """The gate's control calls: held-out tasks (another draw than the evaluation's), passing when
    the answer names the detail the service wants and no other."""
    lines = []
    for task in world.tasks("heldout", n, seed * 2 + 1):
        others = [it.words for k, it in ITEMS.items() if k != task.required]
        check = {"expect": [ITEMS[task.required].words], "forbid": others, "max_tokens": 24}
        lines.append(json.dumps({"id": task.id, "messages": messages(task), **check}))
    path.write_text("\n".join(lines) + "\n")


def start(model: str, store: Path, port: int, learn: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "DOSTREAM_API_KEY": KEY}
    cmd = [sys.executable, "-m", "dostream.cli", "serve", "--model", model, "--store", str(store)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", "warning", *learn],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server did not start: {log.read_text()[-1500:]}")


async def call(c: httpx.AsyncClient, model: str, world: SupportWorld, task, seed: int | None, feedback: bool) -> dict:
    """One call: the model's answer, judged by the service; its reply back as feedback."""
    body = {"model": model, "messages": messages(task), "max_tokens": 24, "stop": ["\n"]}
    body.update({"temperature": 0.0} if seed is None else {"temperature": 0.7, "seed": seed})
    t0 = time.time()
    r = await c.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    latency = time.time() - t0
    res = r.json()
    env = SupportEnv(world)
    env.reset(task)
    step = env.step((res["choices"][0]["message"]["content"] or "") + "\n")
    if feedback:
        text = f"{task.service}: {step.segments[1].text.strip()}"
        fb = {"completion_id": res["id"], "author": "environment", "text": text, "reward": step.reward}
        (await c.post("/v1/feedback", json=fb)).raise_for_status()
    return {"success": bool(step.info["success"]), "latency": latency, "t": t0}


async def play(url: str, model: str, world: SupportWorld, tasks, heldout, args, learning: bool) -> dict:
    points, calls = [], []
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=3600) as c:

        async def evaluate(done: int) -> None:
            if learning and args.sync:
                (await c.post("/v1/learn", json={"wait": True})).raise_for_status()
            if learning:  # the update in progress, if any, finishes first
                while (await c.get("/v1/adapters")).json()["running"] is not None:
                    await asyncio.sleep(0.5)
            version = (await c.get("/v1/adapters")).json()["current"]["version"]
            ok = await asyncio.gather(*(call(c, model, world, t, None, False) for t in heldout))
            points.append({"calls": done, "success": sum(o["success"] for o in ok) / len(ok), "version": version})
            print(f"  after {done} calls: held-out {sum(o['success'] for o in ok)}/{len(ok)} (version {version})")

        for at in range(0, len(tasks), args.wave):
            if at % args.eval_every == 0:
                await evaluate(at)
            wave = tasks[at : at + args.wave]
            calls += await asyncio.gather(
                *(call(c, model, world, t, args.seed * 1_000_003 + at + k, True) for k, t in enumerate(wave))
            )
        await evaluate(len(tasks))
        listing = (await c.get("/v1/adapters")).json()
    return {"points": points, "calls": calls, "adapters": listing}


def latency_split(calls: list[dict], updates: list[dict]) -> dict:
    spans = [
        (u["metrics"]["time/started"], u["metrics"]["time/finished"]) for u in updates if "time/started" in u["metrics"]
    ]
    during = [c["latency"] for c in calls if any(a <= c["t"] + c["latency"] and c["t"] <= b for a, b in spans)]
    idle = [c["latency"] for c in calls if not any(a <= c["t"] + c["latency"] and c["t"] <= b for a, b in spans)]

    def summary(xs):
        return {"n": len(xs), "p50": statistics.median(xs) if xs else None, "max": max(xs) if xs else None}

    return {"during_update": summary(during), "no_update": summary(idle)}


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, style in (("learn", "o-"), ("no-learn", "s--")):
        pts = results["arms"][arm]["points"]
        ax.plot([p["calls"] for p in pts], [p["success"] for p in pts], style, label=arm)
    ax.set_xlabel("calls served")
    ax.set_ylabel("held-out success (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"dostream serve --learn ({results['config']['learner']}, {results['config']['model']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calls", type=int, default=192, help="training calls (conversations with feedback)")
    ap.add_argument("--wave", type=int, default=8, help="concurrent calls per wave")
    ap.add_argument(
        "--eval-every", type=int, default=32, help="held-out evaluation every N calls (a multiple of --wave)"
    )
    ap.add_argument("--heldout", type=int, default=24, help="held-out calls per evaluation")
    ap.add_argument("--control", type=int, default=8, help="control calls of the gate (0: none)")
    ap.add_argument("--learner", default="interventional")
    ap.add_argument("--update-every-tokens", type=int, default=1500)
    ap.add_argument("--learn-threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3, help="the updates' learning rate")
    ap.add_argument("--sync", action="store_true", help="also POST /v1/learn before each evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/serve-learn")
    args = ap.parse_args(argv)
    if args.eval_every % args.wave:
        ap.error("--eval-every must be a multiple of --wave")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    world = SupportWorld(args.seed)
    tasks = world.tasks("train", args.calls, args.seed * 2)
    heldout = world.tasks("heldout", args.heldout, args.seed * 2)
    learn = ["--learn", "--learner", args.learner, "--update-every-tokens", str(args.update_every_tokens)]
    learn += ["--learn-threads", str(args.learn_threads), "--lr", str(args.lr), "--seed", str(args.seed)]
    if args.control:
        control_file(world, args.control, args.seed, out / "control.jsonl")
        learn += ["--control", str(out / "control.jsonl")]
    results = {"config": vars(args), "rules": world.rules(), "arms": {}}
    t0 = time.time()
    for arm, flags in (("no-learn", []), ("learn", learn)):
        port = free_port()
        print(f"== {arm}: dostream serve --model {args.model} {' '.join(flags)}")
        t_arm = time.time()
        proc = start(args.model, out / arm / "store", port, flags, out / f"{arm}.log")
        try:
            played = asyncio.run(play(f"http://127.0.0.1:{port}", args.model, world, tasks, heldout, args, bool(flags)))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        updates = played["adapters"]["data"][1:]
        played["latency"] = latency_split(played["calls"], updates)
        played["acting_success"] = sum(c["success"] for c in played["calls"]) / max(1, len(played["calls"]))
        played["updates"] = [
            {k: u[k] for k in ("version", "accepted", "reason")}
            | {"seconds": u["metrics"].get("time/finished", 0) - u["metrics"].get("time/started", 0)}
            for u in updates
        ]
        played["seconds"] = time.time() - t_arm
        del played["adapters"]
        results["arms"][arm] = played
    results["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    figure(results, out / "curve.png")
    print("\n| calls | " + " | ".join(results["arms"]) + " |\n|---|---|---|")
    for i, p in enumerate(results["arms"]["learn"]["points"]):
        row = [results["arms"][a]["points"][i]["success"] for a in results["arms"]]
        print(f"| {p['calls']} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
    learned = results["arms"]["learn"]
    acc = sum(u["accepted"] for u in learned["updates"])
    print(f"\nupdates: {acc} accepted / {len(learned['updates']) - acc} rejected; latency {learned['latency']}")
    print(f"wall time {results['seconds'] / 60:.1f} min; {out / 'results.json'}, {out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
