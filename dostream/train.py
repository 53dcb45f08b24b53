"""The one training loop: masked causal-LM loss on a view of a stream, LoRA via PEFT.

Every method in dostream trains through `train(rows, cfg, out)`. Rows are `{"input_ids",
"labels"}` (from `render.encode_rows`); labels are -100 where the view masks a token.

What makes it exact:
* The loss of an optimizer step is the mean over *all* supervised tokens of that step (every
  micro-batch, every process): each micro-batch contributes `sum of NLL / step token count`, so the
  result does not depend on how the step is split (docs/design.md invariant 5).
* The vocabulary projection and cross-entropy run only at supervised positions: in an
  interventional stream most tokens are masked, and their logits are never computed.
* Rows with no supervised token never reach the loop (`encode_rows` drops them).

What makes it resumable: checkpoints hold the trainable weights, optimizer, scheduler, every RNG
state and the step; the batch plan is a pure function of (seed, epoch), so a run killed at any
point and restarted with `resume=True` ends with the same weights as an uninterrupted run.
Checkpoints are written to a temp directory and renamed into place, then `latest` is replaced
(`checkpoints.py`). Rows become micro-batches in `batches.py`; the device and precision are
`device.py`'s policy.

Scale-out is Hugging Face Accelerate's: `accelerate launch -m dostream.cli train ...` runs the
same loop under DDP/FSDP/DeepSpeed; each process takes its share of every step's micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dostream.batches import collate, rows_fingerprint, split_tokens, supervised_count
from dostream.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from dostream.config import (
    RunDirError,
    SupervisedBlock,
    atomic_write_text,
    check_config,
    check_run_dir,
    keeps_old_names,
    like,
    opt,
    write_run_record,
)
from dostream.device import (  # noqa: F401 (BF16_EMULATED, bf16_*, DevicePolicy: imported from here too)
    BF16_EMULATED,
    PRECISIONS,
    DevicePolicy,
    autocast,
    bf16_faster,
    bf16_speedup,
    device_policy,
)
from dostream.files import replace_dir as _replace_dir
from dostream.render import IGNORE, RenderBlock
from dostream.scoring import logits_at


@keeps_old_names  # `bf16=` / `--bf16 on|off|auto`: the old spelling of `precision`
@dataclass
class TrainConfig(SupervisedBlock):
    """One run of `train()`. The LoRA/optimiser/batch fields (lr, lora_r, lora_alpha, epochs,
    batch_size, max_length) are the shared `config.SupervisedBlock`; view, chat_template and
    truncation_side are `render.RenderBlock`'s."""

    model: str = opt("smollm2", "model NAME: smollm2 (embedded default), tiny, a .gguf path, a local dir or an HF id")
    view: str = like(RenderBlock, "view", "interventional")
    chat_template: bool = like(RenderBlock, "chat_template", False)
    truncation_side: str = like(RenderBlock, "truncation_side", "auto")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs)", min=0)
    micro_batch_tokens: int = opt(
        -1,
        "run a micro-batch in pieces of at most this many padded tokens (same "
        "gradient, less memory; -1: 1024 on a CPU, where small pieces run faster, "
        "whole on a GPU; 0: whole)",
        min=-1,
    )
    grad_accum: int = opt(1, "micro-batches per optimizer step (per process)", min=1)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    warmup_ratio: float = opt(0.05, "fraction of steps spent warming up linearly from 0", min=0.0, max=1.0)
    schedule: str = opt("cosine", "learning-rate schedule after warm-up", choices=("cosine", "linear", "constant"))
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)", min=0.0)
    lora_dropout: float = opt(0.0, "dropout on the LoRA input", min=0.0, max=0.99)
    target_modules: str = opt("all-linear", "LoRA target modules: all-linear or a comma-separated list of names")
    full_finetune: bool = opt(False, "train every weight instead of a LoRA adapter")
    precision: str = opt(
        "auto",
        "autocast precision: fp32, bf16, or auto (bf16 where a bf16 matmul measures faster than fp32 here)",
        choices=PRECISIONS,
    )
    group_by_length: bool = opt(True, "batch rows of similar length together to waste little on padding")
    seed: int = opt(0, "seed for initialisation, batch order and dropout")
    save_every: int = opt(50, "checkpoint every N optimizer steps (the end is always saved; 0: only the end)", min=0)
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep", min=1)
    merge: bool = opt(False, "also save the base model with the adapter merged in, as OUT/merged")
    progress: bool = opt(True, "show a progress bar")


# What a resumed run may change: how it saves and shows itself, nothing that changes its weights.
RESUME_MAY_CHANGE = ("progress", "save_every", "keep_checkpoints", "merge")


# -- the model ------------------------------------------------------------------------------


def prepare_model(cfg: TrainConfig, model: nn.Module | None = None) -> nn.Module:
    """Load `cfg.model` (unless given) and make it trainable: a fresh LoRA adapter, or every weight.
    A PEFT model passed in keeps its adapter and trains it further (load it with `is_trainable=True`)."""
    from dostream.models import load_model

    if model is not None and hasattr(model, "peft_config") and not cfg.full_finetune:
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the adapter is frozen: load it with is_trainable=True")
        return model
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = model if model is not None else load_model(cfg.model)
        if cfg.full_finetune:
            model.requires_grad_(True)
            return model
        from peft import LoraConfig, get_peft_model

        targets = cfg.target_modules if cfg.target_modules == "all-linear" else cfg.target_modules.split(",")
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)


class SupervisedNLL(nn.Module):
    """Sum of the next-token NLL over supervised positions, and how many there are.

    The decoder runs on every position (masked tokens are context), but the vocabulary projection
    and the cross-entropy run only where the next token is supervised (`scoring.logits_at`; the
    NLL is minus `scoring.target_logprobs`, summed by the fused cross-entropy). Wrapping this in
    one module lets DDP/FSDP see a single forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        supervised = labels != IGNORE
        logits = logits_at(self.model, input_ids, attention_mask, supervised)
        nll = F.cross_entropy(logits.float(), labels[:, 1:][supervised[:, 1:]], reduction="sum")
        return nll, supervised[:, 1:].sum()


# -- steps ----------------------------------------------------------------------------------


def plan_steps(lengths: list[int], cfg: TrainConfig, epoch: int, world: int = 1) -> list[list[list[int]]]:
    """The epoch's optimizer steps, each a list of micro-batches of row indices.

    A pure function of (lengths, seed, epoch): resuming rebuilds exactly the same plan. With
    `group_by_length`, rows are shuffled, cut into mega-batches of 16 micro-batches, and sorted by
    length inside each, so a micro-batch holds rows of similar length (little padding) while the
    order across the epoch stays random."""
    rng = random.Random(cfg.seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bs = cfg.batch_size
    if cfg.group_by_length:
        mega = bs * 16
        order = [i for k in range(0, len(order), mega) for i in sorted(order[k : k + mega], key=lambda i: -lengths[i])]
    micro = [order[k : k + bs] for k in range(0, len(order), bs)]
    if cfg.group_by_length:
        rng.shuffle(micro)
    per_step = cfg.grad_accum * world
    return [micro[k : k + per_step] for k in range(0, len(micro), per_step)]


def accumulate_step(
    acc,
    loss_module: nn.Module,
    rows: list[dict],
    micro: list[list[int]],
    pad_id: int,
    *,
    bf16: bool = False,
    budget: int = 0,
) -> tuple[float, int]:
    """Forward and backward one optimizer step's micro-batches (this process's share), each in
    pieces of at most `budget` padded tokens (`split_tokens`).

    Each piece's loss is its NLL sum divided by the supervised-token count of the *whole*
    step, so the accumulated gradient is that of the step mean however the step is split
    (invariant 5). DDP averages gradients over processes; scaling by the world size undoes that.
    Returns this process's NLL sum and its non-pad token count."""
    n_sup = supervised_count(rows, [i for mb in micro for i in mb])
    mine = [piece for mb in micro[acc.process_index :: acc.num_processes] for piece in split_tokens(rows, mb, budget)]
    # A process with no micro-batch in this step (the last step of an epoch can have fewer than
    # there are processes) still has to join the gradient exchange, or the others wait forever:
    # it runs one row with weight 0, adding nothing to the gradient.
    weights = [1.0] * len(mine) or [0.0]
    mine = mine or [micro[0][:1]]
    nll_total, n_tokens = 0.0, 0
    for j, (idx, weight) in enumerate(zip(mine, weights)):
        batch = {key: v.to(acc.device) for key, v in collate(rows, idx, pad_id).items()}
        sync = contextlib.nullcontext() if j == len(mine) - 1 else acc.no_sync(loss_module)
        with sync, autocast(acc.device, bf16):
            nll, _ = loss_module(**batch)
            acc.backward(nll * (weight * acc.num_processes / n_sup))
        nll_total += weight * nll.item()
        n_tokens += int(weight) * int(batch["attention_mask"].sum())
    return nll_total, n_tokens


# -- the loop -------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    metrics: list[dict]
    out: Path


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warm = int(round(cfg.warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1.0 - frac

    return factor


def train(
    rows: list[dict],
    cfg: TrainConfig,
    out: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    pad_id: int | None = None,
    resume: bool = False,
    extra_record: dict | None = None,
) -> TrainResult:
    """Train on labelled rows; write checkpoints, metrics and the final adapter under `out`.

    `model` may be passed already loaded (the methods chain stages); otherwise `cfg.model` is
    loaded and given a fresh LoRA adapter (or made fully trainable). A directory that holds
    checkpoints is continued only with `resume=True` and the same config (`config.check_run_dir`;
    the fields of `RESUME_MAY_CHANGE` aside), else `config.RunDirError`."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    check_config(cfg)
    out = Path(out)
    rows = [r for r in rows if any(label != IGNORE for label in r["labels"][1:])]
    if not rows:
        raise ValueError("no training rows: every stream was empty or had no supervised token under the view")
    data = rows_fingerprint(rows)
    ck = latest_checkpoint(out)
    # What a checkpoint continues was recorded beside it; a run that saved nothing has nothing to keep.
    stored = check_run_dir(out, cfg, experiment="train", resume=resume, may_change=RESUME_MAY_CHANGE)
    continued = stored if ck is not None and stored is not None else None
    if continued is not None and continued.get("data_sha256", data) != data:
        raise RunDirError(
            f"{out} holds a run trained on other rows (the streams or their rendering changed); "
            "continuing it would mix the two: choose another --out"
        )
    policy = device_policy(cfg.precision)
    cuda, use_bf16 = policy.device.type == "cuda", policy.bf16
    # Precision is ours to switch per call (autocast below); Accelerate's process-wide
    # mixed_precision setting cannot change within a process, and the methods chain several runs.
    acc = Accelerator(cpu=not cuda)
    if continued is not None and "bf16" in continued:
        use_bf16 = bool(continued["bf16"])  # a resumed run keeps the precision it was decided with
    elif acc.num_processes > 1:  # `precision="auto"` measures per process: all follow the first one
        from accelerate.utils import broadcast_object_list

        use_bf16 = bool(broadcast_object_list([use_bf16])[0])
    if os.environ.get("ACCELERATE_USE_CPU") == "True" and acc.num_processes == 1:
        acc.print(
            "dostream train: one process (`accelerate launch --cpu` starts one, whatever --num_processes "
            "says); for N CPU processes use `accelerate launch --multi_gpu --num_processes N` (gloo)"
        )
    budget = cfg.micro_batch_tokens if cfg.micro_batch_tokens >= 0 else (0 if cuda else 1024)
    out.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        write_run_record(
            out,
            cfg,
            {
                "bf16": use_bf16,
                "data_sha256": data,
                "micro_batch_tokens": budget,
                "rows": len(rows),
                "world_size": acc.num_processes,
                **(extra_record or {}),
            },
            experiment="train",
        )

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = prepare_model(cfg, model)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Full fine-tuning updates every weight: the default (foreach) AdamW step over SmolLM2-135M took
    # 0.8-0.9 s on one CPU core, about as long as an 86-token forward and backward; fused, 0.2 s.
    fused = cfg.full_finetune and policy.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    lengths = [len(r["input_ids"]) for r in rows]
    steps_per_epoch = len(plan_steps(lengths, cfg, 0, acc.num_processes))
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total))
    loss_module = SupervisedNLL(model)
    loss_module, optimizer = acc.prepare(loss_module, optimizer)

    step = 0
    ck = ck if resume else None
    if ck is not None:
        step = load_checkpoint(ck, acc.unwrap_model(loss_module).model, optimizer, scheduler)["step"]
        acc.print(f"dostream train: resumed from {ck} (step {step}/{total})")
    metrics_path = out / "metrics.jsonl"
    history = _read_metrics(metrics_path, upto=step)
    if acc.is_main_process:  # a killed run may have logged steps past its last checkpoint
        atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in history))

    bar = tqdm(
        total=total,
        initial=step,
        disable=not (cfg.progress and acc.is_main_process),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    done = step >= total
    epoch = step // steps_per_epoch
    while not done:
        plan = plan_steps(lengths, cfg, epoch, acc.num_processes)
        for k in range(step - epoch * steps_per_epoch, len(plan)):
            t0 = time.perf_counter()
            micro = plan[k]
            n_sup = supervised_count(rows, [i for mb in micro for i in mb])
            nll_total, n_tokens = accumulate_step(acc, loss_module, rows, micro, pad_id, bf16=use_bf16, budget=budget)
            grad_norm = acc.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            loss = acc.reduce(torch.tensor(nll_total, device=acc.device), reduction="sum").item() / n_sup
            tokens = int(acc.reduce(torch.tensor(n_tokens, device=acc.device), reduction="sum").item())
            m = {
                "step": step,
                "epoch": epoch,
                "train/loss": loss,
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                "train/tokens": tokens,
                "train/supervised_tokens": n_sup,
                "train/tokens_per_s": tokens / dt,
                "mask/supervised_frac": n_sup / max(tokens, 1),
                "time/step_s": dt,
            }
            history.append(m)
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:.0f}")
            if step >= total:
                done = True
            if acc.is_main_process and (done or (cfg.save_every and step % cfg.save_every == 0)):
                save_checkpoint(
                    out,
                    step,
                    acc.unwrap_model(loss_module).model,
                    optimizer,
                    scheduler,
                    {"epoch": epoch},
                    cfg.keep_checkpoints,
                )
            if done:
                break
        epoch += 1
    bar.close()
    acc.wait_for_everyone()
    model = acc.unwrap_model(loss_module).model
    if acc.is_main_process:
        _finish(out, model, cfg)
    return TrainResult(model=model, steps=step, metrics=history, out=out)


def _read_metrics(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    return [m for m in map(json.loads, path.read_text().splitlines()) if m["step"] <= upto]


def _finish(out: Path, model: nn.Module, cfg: TrainConfig) -> None:
    """The final weights in user-facing form, each written atomically."""
    _replace_dir(out / ("model" if cfg.full_finetune else "adapter"), model.save_pretrained)
    if cfg.merge and not cfg.full_finetune:
        merged = merged_copy(model)
        _replace_dir(out / "merged", merged.save_pretrained)


def merged_copy(model: nn.Module) -> nn.Module:
    """The base model with the adapter folded in (a deep copy: `model` keeps its adapter)."""
    import copy

    return copy.deepcopy(model).merge_and_unload()
