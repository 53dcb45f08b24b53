"""The delusion experiment: interventional vs standard SFT on tutoring dialogues (docs/reference.md §1).

Two fresh copies of one base model (two fresh LoRA adapters by default) train on the same
dialogues with the same optimizer and seed; only the labels differ:

* standard SFT supervises the authors {protocol, user, agent}: the Agent's lies are targets;
* interventional SFT supervises {protocol, user}: the Agent's turns stay in the context, masked.

The context line is masked in both. Then every model (and the untrained base) is probed on three
fact sets: `seen` (the dialogues' facts, lies corrected by the User), `lie_only` (held-out facts
the training data holds only as uncorrected agent lies) and `held_out` (never in training):

(a) greedy Agent follow-up after the User states the truth, and after the User states the lie,
    classified as naming the true value, the false one, or neither;
(b) Δ = mean per-token log p(true claim) − mean per-token log p(false claim), each scored as the
    Agent's answer to "Tell me about <topic>."; Δ < 0 means the model prefers the lie. Two scorers
    (`SCORERS`): dostream's scores every answer token; the notebook's tokenises prompt and prompt +
    answer as text and starts scoring at the prompt's length, which drops the first answer token.

Both arms start from the same weights and take the same batches in the same order: one order per
seed (`order-s{seed}`) is planned from both arms' rows and configs and must agree; each arm checks
its plan against it before training and what `train()` logged step by step after, and the run
checks that both arms recorded the same initial-weight and order fingerprints.

`dostream reproduce delusion --preset smoke|quick|paper [--seeds N] [--out DIR]` runs it in cached
stages (rerunning resumes), then writes `report.md`, `delusion.png` and `results.json` from the
stage results (`--report-only` rewrites them alone).

This module is the library (`DelusionConfig`, `PRESETS`, `resolve_preset`, `run`); the probes are
`probes.py`'s, the command lives in `dostream/cli/reproduce.py`, the report in `report.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dostream.config import SupervisedBlock, block_values, check_run_dir, keeps_old_names, like, opt, write_run_record
from dostream.envs.tutor.env import fact_sets, generate_dialogues
from dostream.experiments.delusion.probes import probe_model
from dostream.experiments.stages import Stages
from dostream.stream import VIEWS, read_streams, write_streams
from dostream.train import TrainConfig

# The two arms and their views (stream.VIEWS); the context line is masked in both.
ARMS: dict[str, str] = {"standard": "tutor-standard", "interventional": "tutor-interventional"}
MODELS = ("base", "standard", "interventional")
PUBLISHED = {  # docs/reference.md §1: Qwen2.5-0.5B, full fine-tuning, one run, 33 facts seen in training
    "standard": {"mean_delta": -0.131, "prefers_lie": 24, "n": 33},
    "interventional": {"mean_delta": 1.061, "prefers_lie": 5, "n": 33},
}


@keeps_old_names  # `bf16`: the old name of `precision` (flags, records, presets)
@dataclass
class DelusionConfig(SupervisedBlock):
    """One run of the experiment; every field is a flag of `dostream reproduce delusion`. The
    LoRA/optimiser/batch fields (`config.SupervisedBlock`: lr, the peak after a 5% warm-up, then `schedule`;
    lora_r, lora_alpha on all linear layers; epochs over the dialogues, dialogues per step, tokens
    per dialogue) are both arms'."""

    model: str = opt("smollm2", "base model NAME (smollm2, tiny, a .gguf path, a local dir or an HF id)")
    seeds: int = opt(3, "seeds 0..N-1: each draws its own dialogues, adapter init and batch order", min=1)
    n_seen: int = opt(33, "training facts the dialogues are about (of 99)", min=1)
    n_lie_only: int = opt(11, "held-out facts that appear only in uncorrected agent lies (0: none)", min=0)
    n_held_out: int = opt(22, "held-out facts never shown in training (n_lie_only + n_held_out <= 33)", min=0)
    n_dialogues: int = opt(480, "dialogues about the seen facts, per seed", min=1)
    lie_only_per_fact: int = opt(
        -1, "uncorrected-lie dialogues per lie-only fact (-1: the seen facts' lie rate)", min=-1
    )
    p_lie: float = opt(0.5, "probability that the Agent states the false claim", min=0.0, max=1.0)
    p_tail: float = opt(0.5, "probability of a chit-chat tail after the acknowledgement", min=0.0, max=1.0)
    epochs: int = like(SupervisedBlock, "epochs", 4)
    max_steps: int = opt(0, "stop training after this many optimizer steps (0: all epochs)", min=0)
    full_finetune: bool = opt(False, "train every weight instead of a LoRA adapter")
    precision: str = like(TrainConfig, "precision", "auto")
    schedule: str = like(TrainConfig, "schedule", "cosine")
    save_every: int = opt(
        50, "checkpoint training every N steps: a killed run resumes from the last (0: the end)", min=0
    )
    max_length: int = like(SupervisedBlock, "max_length", 256)
    follow_max_tokens: int = opt(24, "greedy follow-up length limit (tokens; a newline also ends it)", min=1)
    follow_dtype: str = opt(
        "bf16", "dtype of the greedy follow-ups: bf16 (fast on CPUs with bf16) or fp32", choices=("bf16", "fp32")
    )
    probe_batch_size: int = opt(32, "rows per forward pass in the probes", min=1)
    progress: bool = opt(True, "show progress bars")


PRESETS: dict[str, DelusionConfig] = {
    # CI: the tiny random model, a handful of dialogues, every stage and the report in seconds.
    "smoke": DelusionConfig(
        model="tiny",
        seeds=2,
        n_seen=4,
        n_lie_only=2,
        n_held_out=2,
        n_dialogues=8,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        lora_r=4,
        lora_alpha=8,
        follow_max_tokens=6,
    ),
    # SmolLM2-135M with LoRA, sized to finish in under 20 minutes on 2 CPU cores with 3 seeds.
    "quick": DelusionConfig(
        n_seen=16,
        n_lie_only=8,
        n_held_out=8,
        n_dialogues=64,
        epochs=1,
        batch_size=4,
        lr=5e-4,
        follow_max_tokens=20,
    ),
    # The notebook's settings (docs/reference.md §1) on smollm2: 480 dialogues over 33 facts, P_LIE 0.6
    # (its code), chit-chat tail 0.5, full fine-tuning, AdamW lr 2e-5 (no schedule named: constant
    # after train's 5% warm-up), clip 1.0, batch 1, 4 epochs, greedy follow-ups of up to 120 tokens
    # cut at the first newline. Precision: bf16 as the notebook, through `device.resolve_precision`
    # ("auto": bf16 autocast where a bf16 matmul measures faster); a full fine-tuning step here was
    # not slower with it (1.55 vs 1.99 s wall, 1.38 vs 1.41 s CPU, one core); weights and AdamW
    # state stay fp32. A full checkpoint (~2 GB) takes ~6 s: every 250 steps (~5 min of training).
    # One seed is 2 x 2,316 steps of ~0.85-1.1 s on this 2-core CPU: 70.7 min measured alone (docs/delusion.md);
    # `--seeds 2`, `--seeds 3` in later sittings add seeds to the same run directory.
    "paper": DelusionConfig(
        seeds=1,
        full_finetune=True,
        lr=2e-5,
        batch_size=1,
        p_lie=0.6,
        follow_max_tokens=120,
        schedule="constant",
        save_every=250,
    ),
}


def resolve_preset(name: str, **overrides) -> DelusionConfig:
    """Preset `name` with some fields changed, e.g. `resolve_preset("smoke", lr=1e-2)`."""
    return dataclasses.replace(PRESETS[name], **overrides)


# -- data -------------------------------------------------------------------------------------
def lie_only_per_fact(cfg: DelusionConfig) -> int:
    if cfg.lie_only_per_fact >= 0:
        return cfg.lie_only_per_fact
    return max(1, round(cfg.n_dialogues * cfg.p_lie / max(cfg.n_seen, 1)))


def make_data(cfg: DelusionConfig, seed: int, stage: Path) -> dict:
    sets = fact_sets(cfg.n_seen, cfg.n_lie_only, cfg.n_held_out)
    streams = generate_dialogues(
        sets["seen"],
        cfg.n_dialogues,
        seed,
        p_lie=cfg.p_lie,
        p_tail=cfg.p_tail,
        lie_only=sets["lie_only"],
        lie_only_per_fact=lie_only_per_fact(cfg),
    )
    write_streams(stage / "dialogues.jsonl", streams)
    meta = [s.meta for s in streams]
    return {
        "dialogues": len(streams),
        "lies": sum(m["lie"] for m in meta),
        "corrected": sum(m["corrected"] for m in meta),
        "lie_only": sum(m["set"] == "lie_only" for m in meta),
        "tails": sum(m["tail"] for m in meta),
    }


# -- training ---------------------------------------------------------------------------------
def train_config(cfg: DelusionConfig, arm: str, seed: int):
    from dostream.train import TrainConfig

    return TrainConfig(
        model=cfg.model,
        view=ARMS[arm],
        **block_values(cfg, SupervisedBlock),
        max_steps=cfg.max_steps,
        full_finetune=cfg.full_finetune,
        precision=cfg.precision,
        schedule=cfg.schedule,
        seed=seed,
        save_every=cfg.save_every,
        keep_checkpoints=1,
        progress=cfg.progress,
    )


def batch_order(rows: list[dict], tcfg) -> list[list[str]]:
    """The stream ids of every optimizer step `train(rows, tcfg)` takes, in order, over all epochs
    (`train.plan_steps`, a pure function of the rows' lengths and the config)."""
    from dostream.train import plan_steps

    lengths = [len(r["input_ids"]) for r in rows]
    total = tcfg.max_steps or len(plan_steps(lengths, tcfg, 0)) * tcfg.epochs
    order: list[list[str]] = []
    epoch = 0
    while len(order) < total:
        order += [[rows[i]["id"] for mb in step for i in mb] for step in plan_steps(lengths, tcfg, epoch)]
        epoch += 1
    return order[:total]


def order_sha256(order: list[list[str]]) -> str:
    return hashlib.sha256(json.dumps(order).encode()).hexdigest()


def weights_sha256(model) -> str:
    """SHA-256 of every weight (names and bytes): what both arms must start from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_same_order(shared: list[list[str]], own: list[list[str]], what: str) -> None:
    """Raise unless `own` (an arm's batches) is the shared order, naming the first step that differs."""
    if own == shared:
        return
    k = next((i for i, (a, b) in enumerate(zip(shared, own)) if a != b), min(len(shared), len(own)))
    raise ValueError(
        f"{what} would not see the shared batches: {len(own)} steps against {len(shared)}, first difference at "
        f"step {k + 1} ({own[k] if k < len(own) else 'none'} against {shared[k] if k < len(shared) else 'none'})"
    )


def arm_rows(cfg: DelusionConfig, arm: str, data: Path, tok):
    from dostream.render import Renderer, encode_rows

    return encode_rows(read_streams(data), Renderer(tok), ARMS[arm], max_length=cfg.max_length)


def make_order(cfg: DelusionConfig, seed: int, data: Path, stage: Path, tok) -> dict:
    """The seed's one batch order, planned from each arm's own rows and config; they must agree."""
    orders = {arm: batch_order(arm_rows(cfg, arm, data, tok)[0], train_config(cfg, arm, seed)) for arm in ARMS}
    shared = orders["standard"]
    for arm, own in orders.items():
        check_same_order(shared, own, f"the {arm} arm (seed {seed})")
    (stage / "order.json").write_text(json.dumps(shared) + "\n")
    return {"steps": len(shared), "order_sha256": order_sha256(shared)}


def train_arm(cfg: DelusionConfig, arm: str, seed: int, data: Path, stage: Path, tok, order: list[list[str]]) -> dict:
    """Train one arm on one seed's dialogues in the shared batch `order`; the weights land in
    `stage/train/{adapter,model}`. Refuses to train on any other order, and checks after training
    that every step `train()` logged took the tokens of the shared order's rows."""
    from dostream.models import load_model
    from dostream.train import train

    rows, stats = arm_rows(cfg, arm, data, tok)
    tcfg = train_config(cfg, arm, seed)
    check_same_order(order, batch_order(rows, tcfg), f"the {arm} arm (seed {seed})")
    model = load_model(cfg.model)
    init = weights_sha256(model)
    t = time.perf_counter()
    result = train(
        rows,
        tcfg,
        stage / "train",
        model=model,
        pad_id=tok.pad_token_id,
        resume=True,
        extra_record={"arm": arm, "authors": sorted(VIEWS[ARMS[arm]]), "render_stats": dataclasses.asdict(stats)},
    )
    seconds = time.perf_counter() - t
    length = {r["id"]: len(r["input_ids"]) for r in rows}
    taken = [m["train/tokens"] for m in result.metrics]
    if taken != [sum(length[i] for i in step) for step in order]:
        raise RuntimeError(f"the {arm} arm (seed {seed}): the steps train() logged are not the shared order's rows")
    shutil.rmtree(stage / "train" / "checkpoints", ignore_errors=True)  # the final weights suffice
    losses = [m["train/loss"] for m in result.metrics]
    return {
        "init_sha256": init,
        "order_sha256": order_sha256(order),
        "steps": result.steps,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "rows": stats.rows,
        "tokens": stats.tokens,
        "supervised_tokens": stats.supervised_tokens,
        "supervised_frac": stats.supervised_frac,
        "supervised_by_author": stats.supervised_by_author,
        "train_seconds": seconds,
        "tokens_per_s": stats.tokens * cfg.epochs / seconds if seconds else None,
    }


def load_trained(cfg: DelusionConfig, stage: Path):
    from dostream.models import load_model

    if cfg.full_finetune:
        return load_model(str(stage / "train" / "model"))
    return load_model(cfg.model, adapter=stage / "train" / "adapter", merge=True)


# -- the run ----------------------------------------------------------------------------------
EXPERIMENT = "delusion"
MAY_CHANGE = ("seeds", "progress", "probe_batch_size", "save_every")  # a rerun of a run directory may change these


def run(cfg: DelusionConfig, out: str | Path, preset: str = "custom") -> Path:
    """Every stage, cached under `out/stages/`: data per seed, base probes, then per (arm, seed)
    training and probes. Returns the run directory, which holds one config (`config.check_run_dir`:
    another one, `MAY_CHANGE` aside, raises `RunDirError`)."""
    from dostream.models import load_model, load_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_run_dir(out, cfg, experiment=EXPERIMENT, may_change=MAY_CHANGE)
    arms = {a: sorted(VIEWS[v]) for a, v in ARMS.items()}
    write_run_record(out, cfg, {"preset": preset, "arms": arms}, experiment=EXPERIMENT)
    stages = Stages(out)
    tok = load_tokenizer(cfg.model)
    sets = fact_sets(cfg.n_seen, cfg.n_lie_only, cfg.n_held_out)
    stages.run("facts", lambda d: {name: [dataclasses.asdict(f) for f in facts] for name, facts in sets.items()})
    for seed in range(cfg.seeds):
        stages.run(f"data-s{seed}", lambda d, seed=seed: make_data(cfg, seed, d))
    stages.run("probe-base", lambda d: probe_model(load_model(cfg.model), tok, sets, cfg))
    for seed in range(cfg.seeds):
        data = stages.dir(f"data-s{seed}") / "dialogues.jsonl"
        stages.run(f"order-s{seed}", lambda d, seed=seed: make_order(cfg, seed, data, d, tok))
        order = json.loads((stages.dir(f"order-s{seed}") / "order.json").read_text())
        trained = {}
        for arm in ARMS:
            name = f"{arm}-s{seed}"
            trained[arm] = stages.run(
                f"train-{name}", lambda d, arm=arm, seed=seed: train_arm(cfg, arm, seed, data, d, tok, order)
            )
            stages.run(
                f"probe-{name}",
                lambda d, name=name: probe_model(load_trained(cfg, stages.dir(f"train-{name}")), tok, sets, cfg),
            )
        check_same_start(trained, seed)
    return out


def check_same_start(trained: dict[str, dict], seed: int) -> None:
    """Both arms' train results must record the same initial weights and the same batch order."""
    for key in ("init_sha256", "order_sha256"):
        values = {arm: r.get(key) for arm, r in trained.items()}
        if len(set(values.values())) != 1:
            raise RuntimeError(f"seed {seed}: the arms differ in {key}: {values}")
