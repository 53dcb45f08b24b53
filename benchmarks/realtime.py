"""Sessions (`WS /v1/realtime`): time from a user's last input event to the agent's first token,
prefill while the user types (`streamed`) against prefill on commit (`on_commit`), and what
listening costs ordinary chat requests sharing the server.

    python benchmarks/realtime.py [--model smollm2] [--lengths 50,200,800] [--sessions 1,8]
                                  [--rate 20] [--repeat 2] [--chat-clients 8] [--chat-s 30] [--json OUT]

One `dostream serve` process on 127.0.0.1 (the embedded SmolLM2-135M-Instruct by default, fp32,
`OMP_NUM_THREADS` = the CPUs). A user message of N tokens (English prose, counted with the model's
tokenizer) is typed word by word at `--rate` tokens a second into `--sessions` concurrent sessions
(all typing at once, each its own message), then committed and answered (`response.create`,
greedy, 16 tokens). Time to first token: from sending `response.create` (the user's last input
event, right after the last word and the commit) to the first `response.output_text.delta`.
`--rate 20` is faster than anyone types (~1-2 tokens/s): streamed prefill has the least time to keep
up, and a slower typist only leaves it more. Modes alternate run by run (`--repeat` rounds), so the
machine's drift moves both alike; the table gives each mean with its t 95% interval and the paired
ratio on_commit/streamed.

Chat cost: `--chat-clients` clients send chat requests (short questions, greedy, 32 tokens) back to
back for `--chat-s` seconds, (a) alone, (b) while `max(--sessions)` sessions type, commit and get
answers to `--chat-message`-token messages, one after another, at each typing speed of
`--chat-rates` with `streamed` prefill, (c) the same with `on_commit` (the same text prefilled at
commit instead): requests/s of each, and the session tokens the server prefilled ahead meanwhile
(its `dostream_prefill_ahead_tokens_total`). Messages short enough that several are committed in a
run, so (b) and (c) do the same session work in it: (b) against (c) is what listening *early*
costs (the same prefill done at another time), (b) against (a) what the sessions' whole work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import websockets
from serve import KEY, PROMPTS, dostream_server

from dostream.config import environment
from dostream.stats import mean_ci

PROSE = (
    "The harbour town wakes slowly in winter. Fishing boats rock against the pier while gulls argue "
    "over scraps, and the baker on the corner pulls the first loaves from an oven older than anyone "
    "can remember. Children walk to school along the sea wall, counting the waves that break over "
    "the rocks, and the old lighthouse keeper, retired now for twenty years, still climbs the hill "
    "each morning to watch the weather come in from the west. "
)


def message(tok, n: int, tag: str) -> list[str]:
    """Words of an English text of `n` tokens (each with its leading space) that begins with `tag`
    (no two messages share a prefix the server could have cached), its sentences in an order
    drawn from `tag`."""
    rng = random.Random(tag)
    sentences = [x.strip() + "." for x in PROSE.split(".") if x.strip()]
    words = [f"Case {tag}:"]
    while len(words) < 4 * n:
        words += " ".join(rng.sample(sentences, len(sentences))).split()
    out: list[str] = []
    while len(tok("".join(out), add_special_tokens=False)["input_ids"]) < n:
        out.append(("" if not out else " ") + words[len(out)])
    return out


async def session_ttft(url: str, words: list[str], rate_tok_s: float, tok, prefill: str) -> dict:
    """One session types `words` at `rate_tok_s`, commits, asks; returns the time to first token."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        json.loads(await ws.recv())  # session.created
        await ws.send(json.dumps({"type": "session.update", "session": {"prefill": prefill, "temperature": 0}}))
        while json.loads(await ws.recv())["type"] != "session.updated":
            pass
        for w in words:
            await ws.send(json.dumps({"type": "input_text_buffer.append", "delta": w}))
            await asyncio.sleep(len(tok(w, add_special_tokens=False)["input_ids"]) / rate_tok_s)
        await ws.send(json.dumps({"type": "input_text_buffer.commit"}))
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 16}}))
        first = None
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "response.output_text.delta" and first is None:
                first = time.perf_counter() - t0
            if event["type"] == "error":
                raise RuntimeError(event["error"]["message"])
            if event["type"] == "response.done":
                return {
                    "ttft_s": first if first is not None else time.perf_counter() - t0,
                    "input_tokens": event["response"]["usage"]["input_tokens"],
                }


async def chat_load(url: str, model: str, clients: int, seconds: float) -> dict:
    """`clients` chat clients back to back for `seconds`: requests/s and their latencies."""
    done: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(c: int, http: httpx.AsyncClient) -> None:
        r = 0
        while time.perf_counter() < stop:
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[(c + r) % len(PROMPTS)]}]}
            body.update(max_tokens=32, temperature=0)
            t = time.perf_counter()
            resp = await http.post(url + "/v1/chat/completions", json=body)
            resp.raise_for_status()
            done.append(time.perf_counter() - t)
            r += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {KEY}"}) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    wall = time.perf_counter() - t0
    return {"requests": len(done), "req_per_s": len(done) / wall, "p50_s": statistics.median(done) if done else None}


async def sessions_row(ws_url: str, tok, n: int, sessions: int, rate: float, prefill: str, seed: int) -> list[dict]:
    msgs = [message(tok, n, f"{prefill}-{seed}-{n}-{sessions}-{s}") for s in range(sessions)]
    return list(await asyncio.gather(*(session_ttft(ws_url, m, rate, tok, prefill) for m in msgs)))


async def chat_with_sessions(url: str, ws_url: str, tok, args, prefill: str | None, rate: float) -> dict:
    """Chat load for `args.chat_s`, with sessions typing `args.chat_message`-token messages at `rate`
    beside it (None: alone), and the tokens prefilled ahead meanwhile."""
    if prefill is None:
        return await chat_load(url, args.model, args.chat_clients, args.chat_s)
    sessions = max(args.sessions)

    async def typing() -> None:
        k = 0
        while True:  # message after message until the chat load ends
            await sessions_row(ws_url, tok, args.chat_message, sessions, rate, prefill, 1000 + k)
            k += 1

    typer = asyncio.create_task(typing())
    await asyncio.sleep(2)  # the sessions are typing when the chat load starts
    try:
        before = prefilled_ahead(url)
        got = await chat_load(url, args.model, args.chat_clients, args.chat_s)
        return {**got, "prefilled_ahead_tokens": prefilled_ahead(url) - before}
    finally:
        typer.cancel()


def prefilled_ahead(url: str) -> float:
    """The server's count of prompt tokens prefilled ahead of their request (`/metrics`)."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("dostream_prefill_ahead_tokens_total")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="50,200,800", help="user message lengths in tokens ('': the chat cost only)")
    ap.add_argument("--sessions", default="1,8", help="concurrent sessions")
    ap.add_argument("--rate", type=float, default=20.0, help="typing speed, tokens a second")
    ap.add_argument("--repeat", type=int, default=2, help="rounds (the modes alternate within each)")
    ap.add_argument("--chat-clients", type=int, default=8)
    ap.add_argument("--chat-s", type=float, default=30.0, help="seconds of each chat-load run (0: skip)")
    ap.add_argument(
        "--chat-rates", default="5,20", help="typing speeds (tokens/s) of the sessions beside the chat load"
    )
    ap.add_argument("--chat-message", type=int, default=100, help="tokens of each message the sessions type then")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.sessions = [int(x) for x in args.sessions.split(",")]
    args.chat_rates = [float(x) for x in args.chat_rates.split(",")]
    from dostream.models import load_tokenizer

    tok = load_tokenizer(args.model)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    rows: list[dict] = []
    chat: dict[str, list[dict]] = {}
    with dostream_server(args, env) as server:
        ws_url = "ws" + server.url.removeprefix("http") + f"/v1/realtime?model={args.model}"
        for r in range(args.repeat):
            for n in args.lengths:
                for s in args.sessions:
                    for prefill in ("streamed", "on_commit") if r % 2 == 0 else ("on_commit", "streamed"):
                        got = asyncio.run(sessions_row(ws_url, tok, n, s, args.rate, prefill, r))
                        row = {"round": r, "tokens": n, "sessions": s, "prefill": prefill, "runs": got}
                        row["ttft_s"] = statistics.mean(g["ttft_s"] for g in got)
                        rows.append(row)
                        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), file=sys.stderr, flush=True)
        if args.chat_s > 0:
            modes = [(None, 0.0)] + [(p, rate) for rate in args.chat_rates for p in ("streamed", "on_commit")]
            for r in range(args.repeat):
                for mode, rate in modes if r % 2 == 0 else modes[::-1]:
                    got = asyncio.run(chat_with_sessions(server.url, ws_url, tok, args, mode, rate))
                    label = f"{mode}@{rate:g}" if mode else "alone"
                    chat.setdefault(label, []).append(got)
                    print(json.dumps({"chat": label, **got}), file=sys.stderr, flush=True)
    print(table(rows, chat, args))
    machine = environment()
    print(f"\n{machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['versions'].get('torch')}")
    if args.json:
        record = {"environment": machine, "settings": vars(args), "sessions": rows, "chat": chat}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


def table(rows: list[dict], chat: dict[str, list[dict]], args) -> str:
    lines = [
        f"Time to first token after the last input event (s), mean [t 95% interval] over {args.repeat} rounds "
        f"(each round's mean over its sessions); typing at {args.rate:g} tokens/s",
        "",
        "| message tokens | sessions | streamed prefill | prefill on commit | on_commit / streamed (paired) | cut |",
        "|---|---|---|---|---|---|",
    ]
    for n in args.lengths:
        for s in args.sessions:
            runs = {
                p: {r["round"]: r["ttft_s"] for r in rows if (r["tokens"], r["sessions"], r["prefill"]) == (n, s, p)}
                for p in ("streamed", "on_commit")
            }
            st, oc = list(runs["streamed"].values()), list(runs["on_commit"].values())
            ratios = [runs["on_commit"][k] / runs["streamed"][k] for k in runs["streamed"] if k in runs["on_commit"]]
            fmt = lambda v: "{:.3f} [{:.3f}, {:.3f}]".format(*mean_ci(v)) if len(v) > 1 else f"{v[0]:.3f}"  # noqa: E731
            cut = 1 - statistics.mean(st) / statistics.mean(oc)
            lines.append(f"| {n} | {s} | {fmt(st)} | {fmt(oc)} | {fmt(ratios)}x | {cut:.0%} |")
    if chat:
        lines += [
            "",
            f"Chat beside sessions: {args.chat_clients} chat clients for {args.chat_s:g} s, requests/s (mean over "
            f"rounds), beside {max(args.sessions)} sessions typing {args.chat_message}-token messages one after another",
            "",
            "| beside | req/s | p50 latency (s) | against alone | prefilled ahead (tokens/s) |",
            "|---|---|---|---|---|",
        ]
        alone = statistics.mean(r["req_per_s"] for r in chat["alone"]) if chat.get("alone") else None
        for label, runs in chat.items():
            rps = statistics.mean(r["req_per_s"] for r in runs)
            p50 = statistics.mean(r["p50_s"] for r in runs if r["p50_s"] is not None)
            rel = f"{rps / alone - 1:+.1%}" if alone else ""
            ahead = statistics.mean(r.get("prefilled_ahead_tokens", 0) for r in runs) / args.chat_s
            what = "nothing" if label == "alone" else "typing at {1} tokens/s, {0} prefill".format(*label.split("@"))
            lines.append(f"| {what} | {rps:.2f} | {p50:.2f} | {rel} | {ahead:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
