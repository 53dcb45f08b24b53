"""GRPO and DAPO on the STEM task with their rollouts drawn by dostream's engine and by vLLM.

    python benchmarks/grpo_backends.py --out runs/grpo-backends [--backends torch,vllm]
                                       [--variants grpo,dapo] [--groups 6] [--tools calculator]
                                       [--json docs/results/grpo_backends.json]

The STEM quick preset's sizes (`experiments/stem/run.py`): SFT-1 on 160 teacher rows (lr 1e-3, batch
4), then from it, for each variant and backend, GRPO (or DAPO) with K = 8 attempts per prompt, 3
groups per step, 96 new tokens, 2 passes, lr 1e-4, beta 0.04, seed 0; `--groups` prompts (the
preset's budget is 12). `--tools calculator` (the default) is the STEM task with the calculator
tool, where SFT-1 on the embedded 135M model solves about 40% (docs/stem_results.md), so groups of
8 attempts are often mixed and GRPO updates; with `--tools none` it solves ~2% and every group is
flat (0 updates). `backend="vllm"` samples every rollout through one kept vLLM engine on the
SFT-1 weights, the adapter being trained passed as a fresh LoRA on every call (always on-policy,
`sampling/vllm_backend.py`); `torch`, through dostream's own engine. Each run's directory holds
`methods/grpo.py`'s files (its config records the backend); the report is a table of them (printed;
with `--json`, the runs, settings and machine too: docs/engines.md shows the table), with how far
the trained adapter moved: the norm of its LoRA B matrices, which start at zero (PEFT's init), so
it is 0 exactly when no update was taken. The two backends draw with different generators (equal
greedy, not equal samples), so their rewards are two draws of the same process, not the same
numbers. Every stage is cached under `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def sft1(out: Path, tok, tools: str):
    """The STEM data (seed 0, the quick preset's sizes) and SFT-1 (with `tools`), cached."""
    from dostream.envs.stem.problems import generate
    from dostream.experiments.stem.run import PRESETS, _train_cfg
    from dostream.methods.sft1 import train_sft1

    p = PRESETS["quick"]
    d_sft, d_agent = generate("sft", p.n_sft, seed=0), generate("agent", p.n_agent, seed=0)
    merged = out / f"sft1-{tools}" / "merged"
    if not (merged / "config.json").exists():
        t = time.perf_counter()
        train_sft1(d_sft, tok, _train_cfg(p, 0), merged.parent, tools=tools)
        print(f"SFT-1: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return d_agent, merged, p


def adapter_norm(adapter: Path) -> float:
    """The Frobenius norm of the adapter's LoRA B matrices together: 0 at PEFT's init, so > 0
    exactly when an update moved the adapter."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return sum(float(t.float().pow(2).sum()) for k, t in tensors.items() if "lora_B" in k) ** 0.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/grpo-backends")
    ap.add_argument("--backends", default="torch,vllm")
    ap.add_argument("--variants", default="grpo,dapo")
    ap.add_argument("--groups", type=int, default=6, help="prompts (groups of K attempts) per run")
    ap.add_argument("--tools", default="calculator", choices=("calculator", "none"), help="the STEM task's tools")
    ap.add_argument("--json", default=None, help="also write the runs, the settings and the machine here")
    args = ap.parse_args(argv)

    from dostream.config import environment
    from dostream.experiments.stem.run import grpo_cfg
    from dostream.methods.grpo import train_grpo
    from dostream.models import load_tokenizer
    from dostream.sampling import vllm_backend

    out = Path(args.out)
    tok = load_tokenizer("smollm2")
    d_agent, merged, p = sft1(out, tok, args.tools)
    runs = []
    for variant in args.variants.split(","):
        for backend in args.backends.split(","):
            d = out / f"{args.tools}-{variant}-{backend}-{args.groups}"
            if not (d / "result.json").exists():
                cfg = grpo_cfg(
                    p, 0, variant == "dapo", groups=args.groups, tools=args.tools, backend=backend, progress=False
                )
                t = time.perf_counter()
                _, info = train_grpo(d_agent, tok, cfg, merged, d)
                wall = time.perf_counter() - t
                vllm_backend._close_all()  # one vLLM engine at a time
                (d / "result.json").write_text(json.dumps({"info": info, "wall_s": wall}, indent=2))
            result = json.loads((d / "result.json").read_text())
            config = json.loads((d / "config.json").read_text())["config"]
            moved = adapter_norm(d / "adapter")
            runs.append({"variant": variant, "requested": config["backend"], "adapter_b_norm": moved, **result})
            print(f"{variant} {backend}: {json.dumps(result)}", file=sys.stderr)
    lines = [
        "| variant | backend (resolved) | groups | flat groups | dropped (DAPO) | updates | samples | "
        "mean reward | adapter's LoRA B norm | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        i = r["info"]
        lines.append(
            f"| {r['variant']} | {i['backend']} | {i['groups']} | {i['flat_groups']} | {i['dropped_groups']} | "
            f"{i['updates']} | {i['samples']} | {i['mean_reward']:.3f} | {r['adapter_b_norm']:.4f} | "
            f"{r['wall_s']:.0f} |"
        )
    print("\n".join(lines))
    if args.json:
        record = {"environment": environment(), "settings": vars(args), "runs": runs}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
