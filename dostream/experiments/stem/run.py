"""`dostream reproduce stem`: the seed paper's STEM comparison, every method, one command.

    dostream reproduce stem --preset smoke|quick|paper [--seeds N] [--out DIR] [--model NAME]
                            [--tools none|calculator] [--dapo] [--FIELD VALUE | --set FIELD=VALUE ...]

For each seed (seed s draws its own D_sft / D_agent / D_test, LoRA inits and samples), in order:

    data            generate D_sft, D_agent, D_test (disjoint by construction)
    base_eval       greedy accuracy of the untrained model on D_test (+ base_retry, below)
    sft1            one epoch on D_sft (solution supervised), merged: every later method starts here
    sft1_eval       SFT-1 on D_test; its attempts are the first attempts of the stream-matched test
    stream          the frozen SFT-1 attempts D_agent items until n_wrong wrong first attempts
    oracle_sft, observational, interventional    each a fresh LoRA on SFT-1 (+ <method>_eval:
                    greedy accuracy on D_test, + <method>_retry)
    repair          stream-matched: on the test items SFT-1 got wrong, each arm sees SFT-1's wrong
                    attempt and the verdict and makes a second attempt (greedy); the `paper`
                    protocol's second attempts, and (arm sft1) SFT-1's under `retry`
    rest, grpo, (dapo)   each a fresh LoRA on SFT-1, + <method>_eval, + <method>_retry

<method>_retry: on the test items the method's own greedy first attempt got wrong, a second
attempt with that attempt (its exact ids) and the verdict in context: the `retry` protocol's only
new generations. The report combines these files into three evaluation protocols (`single`,
`paper`, `retry`; `paper.PROTOCOLS`). A run directory written before the retry stages existed is
upgraded by rerunning the same command: only the missing `*_retry` stages run.

Every stage caches its result under `OUT/seed-<s>/stages/<stage>/` (`result.json` written last), so
an interrupted run resumes at the stage it stopped in, and `--seeds 3` after `--seeds 1` runs only
seeds 1 and 2. A run directory belongs to one configuration: rerunning with another refuses to mix.
The report (`report.md`, `results.json`, `figures/`) is written at the end from the run files, and
`dostream report OUT` rebuilds it at any time.

This module is the library (`StemPreset`, `PRESETS`, `resolve_preset`, `run`); the command lives
in `dostream/cli/reproduce.py`, the report in `report.py`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dostream.config import (
    SupervisedBlock,
    atomic_write_text,
    block_values,
    check_run_dir,
    like,
    opt,
    write_run_record,
)
from dostream.experiments.stages import Stages
from dostream.experiments.stem.paper import METHODS, REPAIR_ARMS
from dostream.stats import wilson

EXPERIMENT = "stem"


@dataclass
class StemPreset(SupervisedBlock):
    """The sizes and hyperparameters of one run; every field is a flag of `dostream reproduce stem`.
    The LoRA/optimiser/batch fields (`config.SupervisedBlock`) apply to every supervised stage
    (SFT-1, ReST, oracle SFT, the stream arms); GRPO takes `lora_r`/`lora_alpha` and its own lr."""

    model: str = opt("smollm2", "model NAME: smollm2 (embedded), tiny, a local dir or an HF id")
    tools: str = opt(
        "none", "none (the paper) or calculator (the agent may call calc(...))", choices=("none", "calculator")
    )
    n_sft: int = opt(200, "|D_sft|: teacher rows for SFT-1", min=1)
    n_agent: int = opt(200, "|D_agent|: items for ReST, GRPO and the stream", min=1)
    n_test: int = opt(100, "|D_test|: held-out questions", min=1)
    n_wrong: int = opt(400, "the stream stops at this many wrong first attempts", min=1)
    rest_groups: int = opt(50, "ReST prompts (groups of K samples)", min=1)
    grpo_groups: int = opt(50, "GRPO prompt budget (groups of K samples)", min=1)
    k: int = opt(8, "group size K for ReST and GRPO", min=2)
    groups_per_step: int = opt(1, "GRPO groups per optimizer step", min=1)
    grpo_iterations: int = opt(2, "GRPO optimisation passes over each sampled batch", min=1)
    grpo_lr: float = opt(1e-4, "GRPO learning rate", gt=0)
    grpo_beta: float = opt(0.04, "GRPO KL weight (k3 to SFT-1)", min=0.0)
    dapo: bool = opt(False, "also run the DAPO variant of GRPO as an extra arm")
    temperature: float = opt(1.0, "sampling temperature for the stream, ReST and GRPO", gt=0)
    max_new_tokens: int = opt(128, "tokens per attempt", min=1)
    sample_batch: int = opt(32, "rows decoded together", min=1)
    max_length: int = like(SupervisedBlock, "max_length", 512)


PRESETS: dict[str, StemPreset] = {
    # Every method for a few steps on a tiny random model: the CI check that the pipeline holds.
    "smoke": StemPreset(
        model="tiny",
        n_sft=16,
        n_agent=8,
        n_test=8,
        n_wrong=6,
        rest_groups=2,
        grpo_groups=2,
        k=4,
        groups_per_step=1,
        dapo=True,
        max_new_tokens=24,
        batch_size=4,
        max_length=256,
    ),
    # The embedded SmolLM2-135M on 2 CPU cores in about 17 minutes per seed (measured, calculator).
    # lr 1e-3 / batch 4: at the paper-like 2e-4 / 8 one epoch of 160 rows left SFT-1 in the base
    # model's own answer style (0/60 correct, no "Final answer:" lines), a useless seed for every arm.
    "quick": StemPreset(
        model="smollm2",
        n_sft=160,
        n_agent=100,
        n_test=50,
        n_wrong=40,
        rest_groups=12,
        grpo_groups=12,
        k=8,
        groups_per_step=3,
        max_new_tokens=96,
        lr=1e-3,
        batch_size=4,
    ),
    # The paper's sizes (docs/reference.md §2) with quick's lr 1e-3 / batch 4: at the paper's
    # 2e-4 / 8 SFT-1 scored 5/100 on the embedded model and the stream sampled 32 wrong of 32 turns,
    # every arm at the floor. GRPO updates once per group, as the paper's (26 non-flat updates).
    # Measured: 50.7 and 60.5 min for seeds 0 and 1 with the calculator, alone on 2 cores (GRPO ~830 s).
    "paper": StemPreset(lr=1e-3, batch_size=4),
}


def methods_of(p: StemPreset) -> list[str]:
    return [m for m in METHODS if m != "dapo" or p.dapo]


# -- helpers --------------------------------------------------------------------------------


def _train_cfg(p: StemPreset, seed: int, model: str | None = None):
    from dostream.train import TrainConfig

    return TrainConfig(model=model or p.model, **block_values(p, SupervisedBlock), seed=seed, save_every=0)


def grpo_cfg(p: StemPreset, seed: int, dapo: bool, **changes):
    """The preset's GRPO (or DAPO) run config, with `changes` (e.g. `backend=`, `groups=`)."""
    from dostream.methods.grpo import GRPOConfig

    fields = dict(
        groups=p.grpo_groups,
        k=p.k,
        groups_per_step=p.groups_per_step,
        iterations=p.grpo_iterations,
        lr=p.grpo_lr,
        beta=p.grpo_beta,
        dapo=dapo,
        temperature=p.temperature,
        max_new_tokens=p.max_new_tokens,
        lora_r=p.lora_r,
        lora_alpha=p.lora_alpha,
        seed=seed,
        tools=p.tools,
    )
    return GRPOConfig(**{**fields, **changes})


def _stats(stats) -> dict:
    d = asdict(stats)
    d["supervised_frac"] = stats.supervised_frac
    d["context_tokens"] = stats.tokens - stats.supervised_tokens
    return d


def _problems(stage_dir: Path, split: str):
    from dostream.envs.stem import Problem

    return [Problem.from_json(json.loads(line)) for line in (stage_dir / f"{split}.jsonl").read_text().splitlines()]


def _load_arm(sft1_dir: Path, adapter: Path | None):
    """SFT-1 (merged), with a method's adapter folded in for fast greedy decoding."""
    from dostream.models import load_model

    return load_model(str(sft1_dir), adapter=adapter, merge=True)


def wrong_first(first_dir: Path, problems):
    """The problems whose greedy first attempt in FIRST_DIR/attempts.jsonl the verifier rejected,
    and those attempts: what a second attempt replays."""
    from dostream.stream import read_streams

    first = {s.id: s for s in read_streams(first_dir / "attempts.jsonl")}
    wrong = [q for q in problems if not first[q.id].meta["first_correct"]]
    return wrong, [first[q.id] for q in wrong]


def second_attempts(load, tok, wrong, replay, p: StemPreset, out: Path, *, desc: str) -> dict:
    """A second greedy attempt on each of `wrong`, after its replayed first attempt: the episode
    replays the attempt's exact ids, the environment answers it again (verdict, "Proposed
    solution:" header), so the context is the stream rows' repair context, rendered as they are.
    `load()` gives the model (not loaded when nothing is wrong)."""
    if not wrong:
        return {"ids": [], "correct": [], "n": 0, "solved": 0, "accuracy": 0.0, "wilson": list(wilson(0, 0))}
    return evaluate(load(), tok, wrong, p, out, desc=desc, replay=replay)


def evaluate(model, tok, problems, p: StemPreset, out: Path, *, desc: str, replay=None) -> dict:
    """Greedy attempts on `problems`; verifier accuracy with a Wilson 95% interval. The attempts
    are kept in OUT/attempts.jsonl (the report and the repair test read them)."""
    from dostream.methods.attempts import accuracy_by_skill, attempt
    from dostream.sampling import SamplingConfig
    from dostream.stream import write_streams

    cfg = SamplingConfig(greedy=True, max_new_tokens=p.max_new_tokens, batch_size=p.sample_batch)
    streams = attempt(model, tok, problems, cfg, tools=p.tools, replay=replay, ids=[q.id for q in problems], desc=desc)
    write_streams(out / "attempts.jsonl", streams)
    correct = [int(bool(s.meta["correct"])) for s in streams]
    n, k = len(correct), sum(correct)
    return {
        "ids": [q.id for q in problems],
        "correct": correct,
        "n": n,
        "solved": k,
        "accuracy": k / n if n else 0.0,
        "wilson": list(wilson(k, n)),
        "by_skill": accuracy_by_skill(streams),
    }


# -- one seed -------------------------------------------------------------------------------


def run_seed(p: StemPreset, seed: int, root: Path, tok, *, log=print) -> None:
    from dostream.envs.stem import generate
    from dostream.models import load_model
    from dostream.stream import read_streams, write_streams

    st = Stages(root / f"seed-{seed}", log=lambda m: log(f"seed {seed} {m}"))

    def data(d: Path):
        sizes = {"sft": p.n_sft, "agent": p.n_agent, "test": p.n_test}
        for split, n in sizes.items():
            atomic_write_text(
                d / f"{split}.jsonl", "".join(json.dumps(q.to_json()) + "\n" for q in generate(split, n, seed=seed))
            )
        return {"sizes": sizes, "seed": seed}

    st.run("data", data)
    dd = st.dir("data")
    d_sft, d_agent, d_test = _problems(dd, "sft"), _problems(dd, "agent"), _problems(dd, "test")
    by_id = {q.id: q for q in d_sft + d_agent + d_test}
    sft1_dir = st.dir("sft1") / "merged"

    def retry(m: str, load) -> None:
        st.run(
            f"{m}_retry",
            lambda d: second_attempts(load, tok, *wrong_first(st.dir(f"{m}_eval"), d_test), p, d, desc=f"retry {m}"),
        )

    st.run("base_eval", lambda d: evaluate(load_model(p.model), tok, d_test, p, d, desc="eval base"))
    retry("base", lambda: load_model(p.model))

    def sft1(d: Path):
        from dostream.methods.sft1 import train_sft1

        result, stats = train_sft1(d_sft, tok, _train_cfg(p, seed), d, tools=p.tools)
        return {"steps": result.steps, "final_loss": result.metrics[-1]["train/loss"], "tokens": _stats(stats)}

    st.run("sft1", sft1)
    st.run("sft1_eval", lambda d: evaluate(load_model(str(sft1_dir)), tok, d_test, p, d, desc="eval SFT-1"))

    def stream(d: Path):
        from dostream.methods.stream_agents import StreamConfig, build_stream, composition

        cfg = StreamConfig(
            n_wrong=p.n_wrong,
            temperature=p.temperature,
            max_new_tokens=p.max_new_tokens,
            chunk=p.sample_batch,
            seed=seed,
            tools=p.tools,
        )
        turns = build_stream(load_model(str(sft1_dir)), tok, d_agent, cfg)
        write_streams(d / "turns.jsonl", turns)
        wrong = [t for t in turns if not t.meta["first_correct"]]
        return {
            "turns": len(turns),
            "wrong": len(wrong),
            "correct": len(turns) - len(wrong),
            "unique_wrong_questions": len({t.meta["problem_id"] for t in wrong}),
            "composition": composition(turns),
        }

    st.run("stream", stream)
    turns = list(read_streams(st.dir("stream") / "turns.jsonl"))

    def rest(d: Path):
        from dostream.methods.rest import RestConfig, sample_groups, select, train_rest

        cfg = RestConfig(
            groups=p.rest_groups,
            k=p.k,
            temperature=p.temperature,
            max_new_tokens=p.max_new_tokens,
            seed=seed,
            tools=p.tools,
        )
        groups = sample_groups(load_model(str(sft1_dir)), tok, d_agent, cfg)
        write_streams(d / "samples.jsonl", [s for g in groups for s in g])
        selected, info = select(groups, cfg.per_group)
        write_streams(d / "selected.jsonl", selected)
        result, stats = train_rest(
            selected, d_sft if cfg.replay else [], tok, _train_cfg(p, seed), sft1_dir, d / "train", tools=p.tools
        )
        return {"selection": info, "steps": result.steps, "tokens": _stats(stats)}

    def grpo(d: Path, dapo: bool):
        from dostream.methods.grpo import train_grpo

        _, info = train_grpo(d_agent, tok, grpo_cfg(p, seed, dapo), sft1_dir, d / "train")
        return {
            "info": info,
            "tokens": {
                "tokens": info["tokens"],
                "supervised_tokens": info["action_tokens"],
                "context_tokens": info["tokens"] - info["action_tokens"],
                "rows": info["samples"],
                "loss": "policy gradient on sampled tokens",
            },
        }

    def oracle_sft(d: Path):
        from dostream.methods.oracle_sft import train_oracle_sft

        result, stats = train_oracle_sft(turns, by_id, tok, _train_cfg(p, seed), sft1_dir, d / "train", tools=p.tools)
        return {
            "steps": result.steps,
            "unique_questions": len({t.meta["problem_id"] for t in turns if not t.meta["first_correct"]}),
            "tokens": _stats(stats),
        }

    def arm(d: Path, which: str):
        from dostream.methods.stream_agents import train_arm

        result, stats = train_arm(turns, tok, which, _train_cfg(p, seed), sft1_dir, d / "train")
        return {"steps": result.steps, "tokens": _stats(stats)}

    trainers = {
        "rest": rest,
        "grpo": lambda d: grpo(d, False),
        "dapo": lambda d: grpo(d, True),
        "oracle_sft": oracle_sft,
        "observational": lambda d: arm(d, "observational"),
        "interventional": lambda d: arm(d, "interventional"),
    }

    def train_and_eval(m: str) -> None:
        st.run(m, trainers[m])
        adapter = st.dir(m) / "train" / "adapter"
        st.run(f"{m}_eval", lambda d: evaluate(_load_arm(sft1_dir, adapter), tok, d_test, p, d, desc=f"eval {m}"))
        retry(m, lambda: _load_arm(sft1_dir, adapter))

    # The headline comparison first (the stream, its two arms and the oracle baseline, then the
    # stream-matched test), the reward-based recipes after it.
    for m in ("oracle_sft", "observational", "interventional"):
        train_and_eval(m)

    def repair(d: Path):
        wrong, replay = wrong_first(st.dir("sft1_eval"), d_test)
        out = {"ids": [q.id for q in wrong], "n": len(wrong), "arms": {}}
        if not wrong:
            return out
        for m in REPAIR_ARMS:
            adapter = None if m == "sft1" else st.dir(m) / "train" / "adapter"
            sub = d / m
            sub.mkdir(exist_ok=True)
            out["arms"][m] = second_attempts(
                lambda: _load_arm(sft1_dir, adapter), tok, wrong, replay, p, sub, desc=f"repair {m}"
            )
        return out

    st.run("repair", repair)
    for m in methods_of(p)[2:]:
        if m not in ("oracle_sft", "observational", "interventional"):
            train_and_eval(m)


# -- the run --------------------------------------------------------------------------------


def resolve_preset(name: str, **overrides) -> StemPreset:
    """Preset `name` with some fields changed, e.g. `resolve_preset("smoke", n_test=4)`."""
    return dataclasses.replace(PRESETS[name], **overrides)


def run(p: StemPreset, out: str | Path, *, preset: str = "custom", seeds: int = 1, log=print) -> Path:
    """Seeds 0..seeds-1, every stage cached under `out/seed-<s>/`; returns the run directory.

    `out` holds one configuration (`config.check_run_dir`: another one raises `RunDirError`); its
    record counts the most seeds any run of it asked for (the report shows those completed)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, not {seeds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = check_run_dir(out, p, experiment=EXPERIMENT)
    record = {"preset": preset, "seeds": max(seeds, int((old or {}).get("seeds", 1)))}
    write_run_record(out, p, record, experiment=EXPERIMENT)

    from dostream.models import load_tokenizer

    tok = load_tokenizer(p.model)
    for seed in range(seeds):
        run_seed(p, seed, out, tok, log=log)
    return out
