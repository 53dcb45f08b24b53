"""Import and render speed of agent logs: `dostream import` on OpenAI-format tool-calling
conversations, then chat-template rendering of the imported streams.

    python benchmarks/bench_import.py [--n 2000] [--json]

The conversations are synthetic (written here, seeded): a system policy, a tool list of four
functions, a user request, 3-5 rounds of one or two assistant tool calls (`content: null` half
the time) and their tool answers, a final answer and sometimes a simulated user's follow-up:
about 6 calls per conversation. Measured: import (read, convert, write JSONL) from a JSON Lines file and from one
JSON array, in conversations/s; rendering with the embedded SmolLM2 tokenizer's chat template (no
tool support: the documented text form) and with a Hermes-style template that writes the tools
itself (`tests/fixtures/import/hermes_template.jinja`), in streams/s and tokens/s. One process,
one thread (`OMP_NUM_THREADS=1` is set).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]},
        },
    }
    for name, desc, arg in [
        ("find_user", "Look a customer up by e-mail.", "email"),
        ("get_order", "The details of an order.", "order_id"),
        ("cancel_order", "Cancel a pending order.", "order_id"),
        ("refund_payment", "Refund an order's payment.", "order_id"),
    ]
]
POLICY = (
    "You are a retail support agent. Verify the customer's identity before acting on an order. "
    "Only pending orders can be cancelled; delivered orders are refunded instead. Never reveal "
    "another customer's data. Confirm every irreversible action with the customer first."
)


def synthetic_openai(n: int, seed: int = 0) -> list[dict]:
    """`n` OpenAI-format conversations with tool calls (see the module docstring)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        email = f"user{rng.randrange(10_000)}@example.com"
        messages = [
            {"role": "system", "content": POLICY},
            {"role": "user", "content": f"Hi, I'm {email}. Something is wrong with my order, can you help?"},
        ]
        k = 0
        for _ in range(rng.randint(3, 5)):
            calls = []
            for _ in range(rng.choice((1, 2))):
                tool = rng.choice(TOOLS)["function"]
                arg = next(iter(tool["parameters"]["properties"]))
                value = email if arg == "email" else f"#W{rng.randrange(10**6):06d}"
                calls.append(
                    {
                        "id": f"call_{i}_{k}",
                        "type": "function",
                        "function": {"name": tool["name"], "arguments": json.dumps({arg: value})},
                    }
                )
                k += 1
            text = None if rng.random() < 0.5 else "Let me check that for you."
            messages.append({"role": "assistant", "content": text, "tool_calls": calls})
            for c in calls:
                status = rng.choice(("pending", "delivered", "cancelled"))
                result = {"ok": True, "status": status, "total": round(rng.uniform(5, 500), 2)}
                messages.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps(result)})
        messages.append({"role": "assistant", "content": "Done: your order is taken care of. Anything else?"})
        if rng.random() < 0.5:
            messages.append({"role": "user", "content": "No, that's all. Thanks!"})
            messages.append({"role": "assistant", "content": "You're welcome, have a good day."})
        rows.append({"id": f"conv-{i:05d}", "tools": TOOLS, "messages": messages})
    return rows


def bench(n: int) -> dict:
    from dostream.importers import ImportReport, import_streams
    from dostream.models import load_tokenizer
    from dostream.render import Renderer

    rows = synthetic_openai(n)
    results: dict = {
        "conversations": n,
        "tool_calls": sum(len(m.get("tool_calls") or []) for r in rows for m in r["messages"]),
    }
    with tempfile.TemporaryDirectory() as d:
        jsonl, array = Path(d) / "convs.jsonl", Path(d) / "convs.json"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        array.write_text(json.dumps(rows, indent=1))
        results["bytes_jsonl"], results["bytes_array"] = jsonl.stat().st_size, array.stat().st_size
        streams = None
        for name, path in (("jsonl", jsonl), ("array", array)):
            t = time.perf_counter()
            report = ImportReport()
            out = Path(d) / f"out-{name}.jsonl"
            with out.open("w") as f:
                kept = []
                for s in import_streams([str(path)], assistant="other", report=report):
                    f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
                    kept.append(s)
            dt = time.perf_counter() - t
            results[f"import_{name}_per_s"] = round(n / dt, 1)
            streams = kept
    tok = load_tokenizer("smollm2")
    hermes = copy.deepcopy(tok)
    hermes.chat_template = (ROOT / "tests/fixtures/import/hermes_template.jinja").read_text()
    m = min(len(streams), 500)
    for name, t_ in (("smollm2_text_form", tok), ("hermes_template_tools", hermes)):
        renderer = Renderer(t_, chat_template=True)
        renderer.render(streams[0])  # warm the template cache and the tool-support probe
        t = time.perf_counter()
        tokens = sum(len(renderer.render(s)) for s in streams[:m])
        dt = time.perf_counter() - t
        results[f"render_{name}_streams_per_s"] = round(m / dt, 1)
        results[f"render_{name}_tokens_per_s"] = round(tokens / dt)
        results[f"render_{name}_tokens_per_stream"] = round(tokens / m)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="conversations to import")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args()
    results = bench(args.n)
    if args.json:
        print(json.dumps(results))
    else:
        for k, v in results.items():
            print(f"{k:>44}  {v}")


if __name__ == "__main__":
    main()
