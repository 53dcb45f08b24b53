"""Sampling tokens/s: `dostream.sampling.sample` vs transformers' `generate`, side by side.

    python benchmarks/bench_sampling.py [--model smollm2] [--batch-sizes 32,1] [--new-tokens 64] [--repeats 2] [--lora 16]

Both sample the same distinct STEM-style prompts (left padded for `generate`) with temperature 0.8
and top-p 0.95, and both are forced to the same length (`generate`: `min_new_tokens` = max; ours:
no EOS id), so tokens/s counts the same tokens. Each precision (fp32, bf16) is tried for both
tools on a copy of the model cast once (the cast is not timed for either), runs alternate between
the tools, and the best of `repeats` runs is kept for each. The floor is this machine's matmul rate
(measured in the same run) over 2 × parameters FLOP per new token; it ignores the prefill, which
both tools also pay.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from dostream.device import torch_dtype


def runnable_dtypes(dtypes) -> tuple[str, ...]:
    """`dtypes` less bf16 where this CPU only emulates it (it would run for hours): said on stderr."""
    from dostream.device import BF16_EMULATED, bf16_speedup

    speed = bf16_speedup("cuda" if torch.cuda.is_available() else "cpu")
    if "bf16" in dtypes and speed < BF16_EMULATED:
        print(f"skipping bf16: a bf16 matmul runs at {speed:.3f}x fp32 here (emulated)", file=sys.stderr)
        return tuple(d for d in dtypes if d != "bf16")
    return tuple(dtypes)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def bench_prompts(n: int) -> list[str]:
    """Distinct prompts of mixed length (about 30–70 tokens), as the STEM environment writes them."""
    subjects = [
        ("A resistor of {a} ohm carries a current of {b} A.", "What is the voltage across it in volts?"),
        ("A block of mass {a} kg moves at {b} m/s.", "What is its kinetic energy in joules?"),
        (
            "{a} g of NaOH (molar mass 40.0 g/mol) is dissolved in water to make {b} L of solution.",
            "What is the molarity of the solution?",
        ),
        (
            "A steel rod with cross-sectional area {b} cm^2 carries an axial load of {a} kN.",
            "What is the engineering stress in MPa? Give the answer to three significant figures.",
        ),
    ]
    out = []
    for i in range(n):
        stem, ask = subjects[i % len(subjects)]
        out.append(
            f"Question:\n{stem.format(a=round(2.5 + 1.7 * i, 1), b=round(0.5 + 0.3 * i, 2))} {ask}\n\nProposed solution:\n"
        )
    return out


def _time_ours(model, tok, prompts, new_tokens) -> tuple[float, int]:
    from dostream.sampling import SamplingConfig, sample

    ids = [tok(p)["input_ids"] for p in prompts]
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}[next(model.parameters()).dtype]  # as given
    cfg = SamplingConfig(
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=new_tokens,
        eos_token_ids=(),
        batch_size=len(prompts),
        precision=precision,
    )
    t = time.perf_counter()
    out = sample(model, tok, ids, cfg)
    return time.perf_counter() - t, sum(len(s.token_ids) for s in out)


def _time_generate(model, tok, prompts, new_tokens) -> tuple[float, int]:
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id,
        )
    return time.perf_counter() - t, (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)


def bench_sampling(
    model,
    tokenizer,
    *,
    batch_size: int = 32,
    new_tokens: int = 64,
    repeats: int = 2,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    samples_per_prompt: int = 1,
) -> dict:
    """Tokens/s of ours and of `generate` at one batch size, per dtype, and the best of each.

    `samples_per_prompt` > 1 repeats each prompt (n samples per question, as ReST and GRPO draw
    them): both tools get the same repeated list; ours prefills each distinct prompt once.

    Returns `{"batch_size", "new_tokens", "prompt_tokens_mean", "by_dtype": {dtype: {...}},
    "ours_tokens_per_s", "ours_dtype", "generate_tokens_per_s", "generate_dtype", "speedup"
    (best ours / best generate), "matmul_gflops", "floor_tokens_per_s", "ours_frac_of_floor"}`.
    """
    assert batch_size % samples_per_prompt == 0, "batch_size must be a multiple of samples_per_prompt"
    prompts = [p for p in bench_prompts(batch_size // samples_per_prompt) for _ in range(samples_per_prompt)]
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    result: dict = {
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "samples_per_prompt": samples_per_prompt,
        "prompt_tokens_mean": sum(len(tokenizer(p)["input_ids"]) for p in prompts) / batch_size,
        "params": n_params,
        "threads": torch.get_num_threads(),
        "by_dtype": {},
        "matmul_gflops": {},
        "floor_tokens_per_s": {},
    }
    for name in dtypes:
        dtype = torch_dtype(name)
        m = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
        m.eval()
        _time_ours(m, tokenizer, prompts, 2)  # warm up both (allocator, kernels)
        _time_generate(m, tokenizer, prompts, 2)
        ours, gen = [], []
        for _ in range(repeats):  # alternate, so drift on a shared machine hits both alike
            ours.append(_time_ours(m, tokenizer, prompts, new_tokens))
            gen.append(_time_generate(m, tokenizer, prompts, new_tokens))
        best_ours = max(n / s for s, n in ours)
        best_gen = max(n / s for s, n in gen)
        gflops = matmul_gflops(dtype)
        result["matmul_gflops"][name] = gflops
        result["floor_tokens_per_s"][name] = gflops * 1e9 / (2 * n_params)
        result["by_dtype"][name] = {
            "ours_tokens_per_s": best_ours,
            "generate_tokens_per_s": best_gen,
            "speedup": best_ours / best_gen,
            "ours_seconds": [round(s, 3) for s, _ in ours],
            "generate_seconds": [round(s, 3) for s, _ in gen],
            "tokens": ours[0][1],
            "ours_frac_of_floor": best_ours / result["floor_tokens_per_s"][name],
        }
        del m
    best_o = max(result["by_dtype"], key=lambda d: result["by_dtype"][d]["ours_tokens_per_s"])
    best_g = max(result["by_dtype"], key=lambda d: result["by_dtype"][d]["generate_tokens_per_s"])
    result.update(
        ours_tokens_per_s=result["by_dtype"][best_o]["ours_tokens_per_s"],
        ours_dtype=best_o,
        generate_tokens_per_s=result["by_dtype"][best_g]["generate_tokens_per_s"],
        generate_dtype=best_g,
    )
    result["speedup"] = result["ours_tokens_per_s"] / result["generate_tokens_per_s"]
    result["ours_frac_of_floor"] = result["by_dtype"][best_o]["ours_frac_of_floor"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch-sizes", default="32,1", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="R",
        help="sample from the model with a random LoRA adapter of rank R on all linear layers, as the methods do",
    )
    p.add_argument(
        "--grouped",
        type=int,
        default=4,
        help="also measure the largest batch as prompts x this many samples each (0: skip)",
    )
    args = p.parse_args(argv)
    from dostream.models import load_model, load_tokenizer

    tok, model = load_tokenizer(args.model), load_model(args.model)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # random B (init_lora_weights=False): the adapter is not the identity
        model = get_peft_model(
            model,
            LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear", init_lora_weights=False),
        )
    kw = dict(new_tokens=args.new_tokens, repeats=args.repeats, dtypes=runnable_dtypes(args.dtypes.split(",")))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    out = {f"batch={b}": bench_sampling(model, tok, batch_size=b, **kw) for b in sizes}
    if args.grouped > 1:
        b = max(sizes)
        out[f"batch={b},samples_per_prompt={args.grouped}"] = bench_sampling(
            model, tok, batch_size=b, samples_per_prompt=args.grouped, **kw
        )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
