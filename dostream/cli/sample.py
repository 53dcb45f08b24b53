"""`dostream sample --model NAME --prompt TEXT [...]`: a quick look at what a model samples.

Each prompt is rendered the way training sees it (`Renderer.prompt_ids`: plain text, or a user turn
under the chat template with `--chat-template`) and sampled `--n` times. `\\n`, `\\t` and `\\\\` in
`--prompt` and `--stop` are unescaped, so `--prompt "Question:\\n2+2?\\n\\nProposed solution:\\n"`
works from a shell. `--json` prints one object per sample: `prompt`, `sample`, `prompt_len`,
`token_ids` (the exact sampled ids), `text`, `finish_reason`; with `--logprobs K`, `logprobs`
and `top_logprobs` (the model's raw distribution: `SamplingConfig.logprobs`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dostream.cli._common import CliError, user_errors
from dostream.config import add_dataclass_args, from_args


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def build_parser() -> argparse.ArgumentParser:
    from dostream.sampling import SamplingConfig

    p = argparse.ArgumentParser(prog="dostream sample", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="smollm2", help="model NAME: smollm2 (default), tiny, an HF id, a local path or a .gguf file"
    )
    p.add_argument("--adapter", default=None, help="a PEFT (LoRA) adapter directory to load on top of the model")
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt text (repeatable; default: all of standard input as one prompt)",
    )
    p.add_argument(
        "--chat-template", action="store_true", help="send the prompt as a user turn in the tokenizer's chat template"
    )
    p.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample instead of readable text")
    # Every other option is a `SamplingConfig` field. `--stop` is repeatable (`--stop A --stop B`)
    # rather than one list; `eos_token_ids` has no command-line form (the tokenizer's are used).
    # The command's defaults are the dataclass's, but a quick look needs fewer new tokens.
    add_dataclass_args(p, SamplingConfig, skip=("stop", "eos_token_ids"), defaults=SamplingConfig(max_new_tokens=64))
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop string (repeatable): a sample ends after the token completing it",
    )
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise CliError("--n must be at least 1")
    texts = [_unescape(t) for t in args.prompt] if args.prompt else [sys.stdin.read()]

    from dostream.models import load_model, load_tokenizer
    from dostream.render import Renderer
    from dostream.sampling import SamplingConfig, sample
    from dostream.stream import Segment, Stream

    with user_errors():
        config = from_args(SamplingConfig, args, stop=tuple(_unescape(s) for s in args.stop))
        tok = load_tokenizer(args.model)
        # Merged for speed: a quick look does not need the adapter kept separate.
        model = load_model(args.model, adapter=args.adapter or None, merge=True)
        renderer = Renderer(tok, chat_template=args.chat_template)
        author = "user" if args.chat_template else "context"
        prompts = [renderer.prompt_ids(Stream(f"prompt-{i}", [Segment(author, t)])) for i, t in enumerate(texts)]
    if any(not p for p in prompts):
        raise CliError("an empty prompt has no tokens to condition on")

    start = time.perf_counter()
    samples = sample(model, tok, [p for p in prompts for _ in range(args.n)], config)
    elapsed = time.perf_counter() - start
    for k, s in enumerate(samples):
        i, j = divmod(k, args.n)
        if args.json:
            row = {
                "prompt": i,
                "sample": j,
                "prompt_len": s.prompt_len,
                "token_ids": s.token_ids,
                "text": s.text,
                "finish_reason": s.finish_reason,
            }
            if s.logprobs is not None:
                row.update(logprobs=s.logprobs, top_logprobs=s.top_logprobs)
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            head = f"prompt {i + 1}, " if len(prompts) > 1 else ""
            print(f"── {head}sample {j + 1}/{args.n} · {s.finish_reason} · {len(s.token_ids)} tokens ──")
            print(s.text)
    n_tokens = sum(len(s.token_ids) for s in samples)
    print(
        f"dostream sample: {len(samples)} samples, {n_tokens} tokens in {elapsed:.1f} s "
        f"({n_tokens / max(elapsed, 1e-9):.0f} tokens/s)",
        file=sys.stderr,
    )
    return 0
