"""Sessions (`WS /v1/realtime`): time from a user's last input event to the agent's first token,
prefill while the user types (`streamed`) against prefill on commit (`on_commit`), and what
listening costs ordinary chat requests sharing the server.

    python benchmarks/realtime.py [--model smollm2] [--lengths 50,200,800] [--sessions 1,8]
                                  [--rate 20] [--repeat 2] [--chat-clients 8] [--chat-s 30] [--json OUT]
                                  [--chat-rates 5,20] [--first-round 0] [--lockstep]
    python benchmarks/realtime.py --combine A.json B.json [--json OUT]

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
commit instead), (d) `plain`: the same users without sessions, each message (typed at the same
pace, nothing sent meanwhile) sent as an ordinary streamed chat request at the moment the session
would have committed it (greedy, 16 tokens, as the sessions' answers): the server without the
session feature. Requests/s of each, the users' own mean time to first token, and from the server's `/metrics` the session tokens it
prefilled ahead meanwhile and its decode steps' seconds (the sampling thread's busy time). Each
session goes on at its own pace, its next message `--chat-pause` seconds after its commit (whatever
the mode: faster answers bring no more messages), its first message shortened so that the sessions'
commits are spread over a message's typing (`--lockstep`: all at once, as before 2026-12-07), so (b) and (c) do
the same session work in a run: (b) against (c) is what listening *early* costs (the same prefill
done at another time), (b) against (d) what listening costs against the same users served as
plain chat requests, (b) against (a) what the sessions' whole work costs. Every run types
messages of its own (no prompt the prefix cache holds from an earlier run); the table gives each
mode's requests/s and the paired ratios (round by round) with t 95% intervals. Rounds can be run
in parts (`--first-round`, then `--combine` the records).
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
                    "answered_s": time.perf_counter() - t0,
                    "input_tokens": event["response"]["usage"]["input_tokens"],
                }


async def plain_ttft(url: str, model: str, words: list[str], rate_tok_s: float, tok) -> dict:
    """The same user without sessions: types `words` at `rate_tok_s` (nothing sent meanwhile), then
    sends them as an ordinary streamed chat request (greedy, 16 tokens, as a session's answer);
    returns the time to first token from sending it."""
    for w in words:
        await asyncio.sleep(len(tok(w, add_special_tokens=False)["input_ids"]) / rate_tok_s)
    body = {"model": model, "messages": [{"role": "user", "content": "".join(words)}], "stream": True}
    body.update(max_tokens=16, temperature=0)
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {KEY}"}) as http:
        t0, first = time.perf_counter(), None
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if first is None and line.startswith("data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    first = time.perf_counter() - t0 if choices[0].get("delta", {}).get("content") else None
        answered = time.perf_counter() - t0
    return {"ttft_s": first if first is not None else answered, "answered_s": answered}


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
    p50 = statistics.median(done) if done else None
    return {"requests": len(done), "req_per_s": len(done) / wall, "p50_s": p50, "wall_s": wall}


async def sessions_row(ws_url: str, tok, n: int, sessions: int, rate: float, prefill: str, seed: int) -> list[dict]:
    msgs = [message(tok, n, f"{prefill}-{seed}-{n}-{sessions}-{s}") for s in range(sessions)]
    return list(await asyncio.gather(*(session_ttft(ws_url, m, rate, tok, prefill) for m in msgs)))


async def chat_with_sessions(url: str, ws_url: str, tok, args, prefill: str | None, rate: float, run: int = 0) -> dict:
    """Chat load for `args.chat_s`, with sessions typing `args.chat_message`-token messages at `rate`
    beside it (None: alone), and the server's work meanwhile (`counters`). Run `run`'s messages are
    its own: a message typed in an earlier run would find its prompt in the server's prefix cache.

    Each session types, commits and gets its answer, message after message, on its own, and begins
    the next `args.chat_pause` seconds after its commit (its answer read; later if the answer is not
    done by then), so a session's pace does not depend on how soon its answers come (a faster answer
    would otherwise bring more messages, more work, into the window); the first message of session
    s of S is (s + 1) / S of the length, so the sessions commit
    at times spread over a message's typing, as users do, and any window of the chat load holds the
    same share of each session's work in either prefill mode. (`--lockstep`: the sessions type a
    message each at once, the next when all are answered; a window then holds whole bursts of prefill
    at commit, or prefill ahead of the next messages, depending on where it falls.)"""
    sessions = max(args.sessions)

    async def lockstep() -> None:
        k = 0
        while True:  # message after message until the chat load ends
            await sessions_row(ws_url, tok, args.chat_message, sessions, rate, prefill, 1000 * (run + 1) + k)
            k += 1

    async def typing(s: int) -> None:
        k = 0
        while True:
            n = args.chat_message if k else max(1, args.chat_message * (s + 1) // sessions)
            words = message(tok, n, f"{prefill}-{1000 * (run + 1) + k}-{n}-{sessions}-{s}")
            if prefill == "plain":  # no session: the message as a chat request when it would be committed
                got = await plain_ttft(url, args.model, words, rate, tok)
            else:
                got = await session_ttft(ws_url, words, rate, tok, prefill)
            ttfts.append(got["ttft_s"])
            await asyncio.sleep(max(0.0, args.chat_pause - got["answered_s"]))  # reading the answer
            k += 1

    typers, ttfts = [], []
    if prefill is not None:
        typers = [asyncio.create_task(lockstep())] if args.lockstep else [typing(s) for s in range(sessions)]
        typers = [asyncio.ensure_future(t) for t in typers]
        await asyncio.sleep(2)  # the sessions are typing when the chat load starts
    try:
        before = counters(url)
        got = await chat_load(url, args.model, args.chat_clients, args.chat_s)
        after = counters(url)
        got["session_ttft_s"] = statistics.mean(ttfts) if ttfts else None  # (answers begun in the window)
        return {**got, **{k: after[k] - before[k] for k in after}}
    finally:
        for t in typers:
            t.cancel()
        await asyncio.gather(*typers, return_exceptions=True)
        await asyncio.sleep(1.5)  # what the server still had of the sessions: done before the next run


COUNTERS = {
    "dostream_prefill_ahead_tokens_total": "prefilled_ahead_tokens",
    "dostream_decode_step_seconds_sum": "step_s",
    "dostream_decode_step_seconds_count": "steps",
    "dostream_decode_join_steps_total": "join_steps",
}


def counters(url: str) -> dict[str, float]:
    """The server's counts (`/metrics`): session tokens prefilled ahead of their request, and the
    sampling thread's decode steps, their seconds, and those that prefilled joining rows."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    out = dict.fromkeys(COUNTERS.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        name = name.split("{")[0]  # (labels, if any: summed)
        if name in COUNTERS:
            out[COUNTERS[name]] += float(value)
    return out


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
    ap.add_argument("--chat-pause", type=float, default=5.0, help="seconds from a session's commit to its next message")
    ap.add_argument(
        "--lockstep", action="store_true", help="the sessions beside the chat load type their messages all at once"
    )
    ap.add_argument("--first-round", type=int, default=0, help="the first round's number (a run that goes on another)")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--combine", nargs="+", default=None, metavar="JSON", help="no run: the table of these records' rounds together"
    )
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.json)
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
        for r in range(args.first_round, args.first_round + args.repeat):
            for n in args.lengths:
                for s in args.sessions:
                    for prefill in ("streamed", "on_commit") if r % 2 == 0 else ("on_commit", "streamed"):
                        got = asyncio.run(sessions_row(ws_url, tok, n, s, args.rate, prefill, r))
                        row = {"round": r, "tokens": n, "sessions": s, "prefill": prefill, "runs": got}
                        row["ttft_s"] = statistics.mean(g["ttft_s"] for g in got)
                        rows.append(row)
                        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), file=sys.stderr, flush=True)
        if args.chat_s > 0:
            modes = [(None, 0.0)] + [(p, r) for r in args.chat_rates for p in ("streamed", "on_commit", "plain")]
            for r in range(args.first_round, args.first_round + args.repeat):
                for mode, rate in modes if r % 2 == 0 else modes[::-1]:
                    got = asyncio.run(chat_with_sessions(server.url, ws_url, tok, args, mode, rate, run=r))
                    label = f"{mode}@{rate:g}" if mode else "alone"
                    chat.setdefault(label, []).append({"round": r, **got})
                    print(json.dumps({"chat": label, **got}), file=sys.stderr, flush=True)
                    save(args, rows, chat)  # (run by run: a run cut short keeps what it measured)
    print(table(rows, chat, args))
    machine = save(args, rows, chat)
    print(f"\n{machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['versions'].get('torch')}")
    return 0


def save(args, rows: list[dict], chat: dict[str, list[dict]]) -> dict:
    """Write the record to `args.json` (if given); returns the machine's description."""
    machine = environment()
    if args.json:
        record = {"environment": machine, "settings": vars(args), "sessions": rows, "chat": chat}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return machine


def combine(paths: list[str], out: str | None) -> int:
    """The table of several records' rounds together (runs of one setting split to fit a time
    limit, `--first-round` numbering each run's rounds after the last's); `out`: the combined record."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    rows = [row for r in records for row in r["sessions"]]
    chat: dict[str, list[dict]] = {}
    for r in records:
        for label, runs in r["chat"].items():  # (records before rounds were kept: in round order)
            chat.setdefault(label, []).extend({"round": i, **run} for i, run in enumerate(runs))
    settings = {**records[0]["settings"], "repeat": len({run["round"] for runs in chat.values() for run in runs})}
    if rows:
        settings["repeat"] = len({row["round"] for row in rows})
    settings["combined"] = paths
    print(table(rows, chat, argparse.Namespace(**settings)))
    if out:
        record = {"environment": records[0]["environment"], "settings": settings, "sessions": rows, "chat": chat}
        Path(out).write_text(json.dumps(record, indent=2))
    return 0


PLAIN = ("on_commit", "plain")  # what streamed prefill is compared with, beside the chat load


def paired(a: list[dict], b: list[dict]) -> str:
    """a / b in requests/s, round by round (the rounds both have): mean [t 95% interval]."""
    of = {run.get("round", i): run["req_per_s"] for i, run in enumerate(b)}
    ratios = [run["req_per_s"] / of[k] for i, run in enumerate(a) if (k := run.get("round", i)) in of]
    if len(ratios) < 2:
        return f"{ratios[0]:.2f}x" if ratios else ""
    return "{:.2f}x [{:.2f}, {:.2f}]".format(*mean_ci(ratios))


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
            "| beside | req/s [t 95%] | p50 latency (s) | against alone (paired) | streamed / on_commit (paired) "
            "| streamed / plain (paired) | prefilled ahead (tokens/s) | decode steps' share of the run "
            "| users' time to first token (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]

        def order(label: str) -> tuple:
            mode, _, rate = label.partition("@")
            return (mode != "alone", float(rate or 0), ("streamed", "on_commit", "plain").index(mode) if rate else 0)

        for label, runs in sorted(chat.items(), key=lambda kv: order(kv[0])):
            rps = [r["req_per_s"] for r in runs]
            fmt = "{:.2f} [{:.2f}, {:.2f}]".format(*mean_ci(rps)) if len(rps) > 1 else f"{rps[0]:.2f}"
            p50 = statistics.mean(r["p50_s"] for r in runs if r["p50_s"] is not None)
            rel = paired(runs, chat["alone"]) if chat.get("alone") and label != "alone" else ""
            mode, _, rate = label.partition("@")
            vs, plain = ("", "") if mode != "streamed" else (paired(runs, chat.get(f"{m}@{rate}", [])) for m in PLAIN)
            ahead = statistics.mean(r.get("prefilled_ahead_tokens", 0) for r in runs) / args.chat_s
            what = "nothing" if label == "alone" else f"typing at {rate} tokens/s, {mode} prefill"
            what = what.replace("plain prefill", "no sessions: chat requests at commit")
            ttft = [r["session_ttft_s"] for r in runs if r.get("session_ttft_s") is not None]
            ttft_s = "{:.2f} [{:.2f}, {:.2f}]".format(*mean_ci(ttft)) if len(ttft) > 1 else ""
            busy = [r["step_s"] / r.get("wall_s", args.chat_s) for r in runs if "step_s" in r]
            busy_s = f"{statistics.mean(busy):.0%}" if busy else ""
            lines.append(f"| {what} | {fmt} | {p50:.2f} | {rel} | {vs} | {plain} | {ahead:.0f} | {busy_s} | {ttft_s} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
