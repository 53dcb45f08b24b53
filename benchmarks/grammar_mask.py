"""Grammar-constrained decoding: the per-step cost of 32 rows' token masks, by library.

    python benchmarks/grammar_mask.py [--rows 32] [--out docs/results/grammar_mask.json]

For the SmolLM2 tokenizer (vocabulary 49152) and a JSON schema with a string, an integer, an enum
and an array, each library compiles the grammar once (timed apart), then 32 rows advance through
32 different valid JSON documents (`json.dumps` of each, tokenized) token by token. A step is what
the decode loop would pay: fill the 32 rows' bitmasks, apply them to a (32, 49152) float32 logits
tensor (-inf outside the allowed set; one shared numpy unpack for every library, so the libraries
differ only in their own work), and have each row's matcher accept its token. Reported: the median
step over all steps (and the mask part alone), and that as a fraction of a SmolLM2-135M decode
step at 32 rows on this machine (~115 ms, 2-core AMD EPYC, AVX2). Libraries not installed are
skipped. Result (docs/results/grammar_mask.json): xgrammar is fastest
(~3.5 ms a step, llguidance ~5.4 ms, outlines-core ~6.4 ms: 3-6% of a decode step, most of it the
shared mask application), but it silently compiles schemas with keywords it does not implement;
dostream uses llguidance, which names them (see dostream/sampling/grammar.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from dostream.models import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
DECODE_STEP_S = 0.115  # SmolLM2-135M, 32 rows, one decode step on this machine


def documents(n: int) -> list[str]:
    colors = ["red", "green", "blue"]
    return [
        json.dumps({"name": f"user {i} of the list", "age": 17 + 3 * i, "color": colors[i % 3], "tags": ["a", f"t{i}"]})
        for i in range(n)
    ]


def apply_bitmask(logits: torch.Tensor, bitmask: np.ndarray) -> None:
    """-inf wherever a row's bit is 0 (bit j of int32 word w is token 32w + j)."""
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
    logits.masked_fill_(torch.from_numpy(allowed) == 0, float("-inf"))


def run_llguidance(tok, docs, ids):
    import llguidance as llg

    t0 = time.perf_counter()
    lltok = llg.LLTokenizer(tok.backend_tokenizer.to_str(), n_vocab=len(tok), eos_token=tok.eos_token_id)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matchers = [llg.LLMatcher(lltok, grammar) for _ in docs]
    t_compile = time.perf_counter() - t0
    executor = llg.LLExecutor()
    words = (len(tok) + 31) // 32
    bitmask = np.zeros((len(docs), words), dtype=np.int32)

    def fill(live):
        executor.unsafe_compute_mask_ptr([(matchers[r], r) for r in live], bitmask.ctypes.data, words * 4, len(docs))

    def accept(r, t):
        assert matchers[r].consume_token(t), matchers[r].get_error()

    return "llguidance", llg_version(), t_tok, t_compile, fill, accept, bitmask, lambda r: matchers[r].is_accepting()


def llg_version() -> str:
    from importlib.metadata import version

    return version("llguidance")


def run_xgrammar(tok, docs, ids):
    from importlib.metadata import version

    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    matchers = [xgr.GrammarMatcher(compiled) for _ in docs]
    t_compile = time.perf_counter() - t0
    bitmask_t = xgr.allocate_token_bitmask(len(docs), len(tok))
    bitmask = bitmask_t.numpy()

    def fill(live):
        for r in live:
            matchers[r].fill_next_token_bitmask(bitmask_t, r)

    def accept(r, t):
        assert matchers[r].accept_token(t), (r, t)

    return (
        "xgrammar",
        version("xgrammar"),
        t_tok,
        t_compile,
        fill,
        accept,
        bitmask,
        lambda r: matchers[r].is_terminated(),
    )


def run_outlines(tok, docs, ids, budget_s: float = 120.0):
    from importlib.metadata import version

    import outlines_core as oc

    t0 = time.perf_counter()
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    vocab: dict[bytes, list[int]] = {}
    for s, i in tok.get_vocab().items():
        if i == tok.eos_token_id:
            continue
        b = bytes(byte_decoder[c] for c in s) if all(c in byte_decoder for c in s) else s.encode()
        vocab.setdefault(b, []).append(i)
    vocabulary = oc.Vocabulary(tok.eos_token_id, vocab)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    regex = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index = oc.Index(regex, vocabulary)
    guides = [oc.Guide(index) for _ in docs]
    t_compile = time.perf_counter() - t0
    words = (len(tok) + 31) // 32
    bitmask = np.zeros((len(docs), words), dtype=np.int32)

    def fill(live):
        for r in live:
            row = bitmask[r]
            guides[r].write_mask_into(row.ctypes.data, row.size, 4)

    def accept(r, t):
        if t != tok.eos_token_id:  # (its final state allows EOS; advancing past it raises)
            guides[r].advance(t)

    return (
        "outlines-core",
        version("outlines-core"),
        t_tok,
        t_compile,
        fill,
        accept,
        bitmask,
        lambda r: guides[r].is_finished(),
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the character a byte-level BPE vocabulary writes for it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def measure(setup, tok, docs, ids) -> dict:
    name, ver, t_tok, t_compile, fill, accept, bitmask, done = setup(tok, docs, ids)
    logits = torch.randn(len(docs), len(tok))
    steps, masks, fills = [], [], []
    for t in range(max(map(len, ids))):
        live = [r for r in range(len(docs)) if t < len(ids[r])]
        t0 = time.perf_counter()
        fill(live)
        tf = time.perf_counter()
        scratch = logits.clone()
        apply_bitmask(scratch, bitmask)
        t1 = time.perf_counter()
        for r in live:
            assert np.isfinite(scratch[r, ids[r][t]].item()), f"{name}: row {r} token {t} masked out"
            accept(r, ids[r][t])
        t2 = time.perf_counter()
        masks.append(t1 - t0)
        fills.append(tf - t0)
        steps.append(t2 - t0)
    assert all(done(r) for r in range(len(docs))) or name == "outlines-core", f"{name}: a row is not complete"
    step = statistics.median(steps)
    return {
        "library": name,
        "version": ver,
        "tokenizer_s": round(t_tok, 3),
        "compile_s": round(t_compile, 3),
        "steps": len(steps),
        "median_step_ms": round(1000 * step, 3),
        "median_fill_ms": round(1000 * statistics.median(fills), 3),
        "median_mask_ms": round(1000 * statistics.median(masks), 3),
        "fraction_of_decode_step": round(step / DECODE_STEP_S, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--libraries", default="llguidance,xgrammar,outlines-core")
    ap.add_argument("--out", default="docs/results/grammar_mask.json")
    args = ap.parse_args()
    tok = load_tokenizer("smollm2")
    docs = documents(args.rows)
    ids = [tok.encode(d, add_special_tokens=False) + [tok.eos_token_id] for d in docs]
    runs = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines}
    results = []
    for lib in args.libraries.split(","):
        try:
            results.append(measure(runs[lib], tok, docs, ids))
        except Exception as e:  # noqa: BLE001 - a library that fails is reported, not fatal
            results.append({"library": lib, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(results[-1]), flush=True)
    print(
        f"\n{'library':14} {'version':9} {'compile s':>9} {'step ms':>8} {'fill ms':>8} {'mask ms':>8} {'of decode':>9}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['library']:14} error: {r['error'][:80]}")
        else:
            print(
                f"{r['library']:14} {r['version']:9} {r['compile_s']:9.3f} {r['median_step_ms']:8.3f} "
                f"{r['median_fill_ms']:8.3f} {r['median_mask_ms']:8.3f} {100 * r['fraction_of_decode_step']:8.2f}%"
            )
    with open(args.out, "w") as f:
        json.dump(
            {
                "rows": args.rows,
                "vocab": len(tok),
                "schema": SCHEMA,
                "decode_step_s": DECODE_STEP_S,
                "results": results,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
