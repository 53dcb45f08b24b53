"""The demo: the rule's effect on the embedded model in a few minutes (`dostream demo`, `make demo`).

Every training stream is the same story: the User asks about a fact, the Agent answers with a
wrong claim (its own attempt: an `agent` segment), the User corrects it with the true claim, the
Agent thanks it. Two LoRA adapters start from the same weights and the same initialisation and see
the same rows in the same order; only the labels differ:

* interventional (`tutor-interventional`): the Agent's turns stay in the context, masked;
* observational (`tutor-standard`): the Agent's turns are targets too, its wrong claim included.

The probe asks about every trained fact with a phrasing the training never used ("Tell me about
<topic>."): which claim does each model find likelier as the Agent's answer (mean per-token
log-probability of the true claim minus the false one, Δ), and what does it answer greedily
(naming the true value, the false one, or neither)? The untrained model is probed the same way.

>>> res = run_demo(DemoConfig(model="tiny", n_facts=4, epochs=1), "runs/demo")  # doctest: +SKIP
>>> res["models"]["interventional"]["prefers_false"]                              # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dostream.config import SupervisedBlock, block_values, like, opt
from dostream.envs.tutor.env import ASK, TRAIN_FACTS, Fact, answer_stream, classify_follow_up, generate_dialogues
from dostream.envs.tutor.env import prompt_stream as question_stream

# The two arms and their views (stream.VIEWS).
ARMS: dict[str, str] = {"interventional": "tutor-interventional", "observational": "tutor-standard"}
PROBE_ASK = ASK[0]  # the probe's question; the training dialogues never use it
TRAIN_ASKS = ASK[1:]


@dataclass
class DemoConfig(SupervisedBlock):
    """The demo's settings (`dostream demo --help`). Chosen before any result was seen: the
    delusion experiment's dialogues with every Agent answer wrong and corrected, LoRA at the
    learning rate the old demo used."""

    model: str = opt("smollm2", "model NAME: smollm2 (embedded default), tiny, a local dir or an HF id")
    n_facts: int = opt(32, "facts the dialogues are about (each answered wrongly by the Agent, then corrected)", min=1)
    dialogues_per_fact: int = opt(2, "dialogues per fact (different phrasings)", min=1)
    # Seeds 0-2 were run with these settings (README); 2 is the one whose counts lie closest to the
    # three seeds' means, so the default shows a typical run, not the best.
    seed: int = opt(2, "seed for the dialogues, the LoRA initialisation and the batch order")
    lr: float = like(SupervisedBlock, "lr", 1e-3)
    epochs: int = like(SupervisedBlock, "epochs", 2)
    max_length: int = like(SupervisedBlock, "max_length", 256)
    max_new_tokens: int = opt(24, "tokens of each greedy answer", min=1)
    progress: bool = opt(True, "show progress")


def facts_of(cfg: DemoConfig) -> list[Fact]:
    if not 1 <= cfg.n_facts <= len(TRAIN_FACTS):
        raise ValueError(f"n_facts must be in 1..{len(TRAIN_FACTS)}, got {cfg.n_facts}")
    return list(TRAIN_FACTS[: cfg.n_facts])


def dialogues(cfg: DemoConfig):
    """The training streams: every Agent answer is wrong and corrected by the User."""
    facts = facts_of(cfg)
    return generate_dialogues(
        facts, cfg.n_facts * cfg.dialogues_per_fact, cfg.seed, p_lie=1.0, p_tail=0.0, asks=TRAIN_ASKS
    )


def probe(model, tok, facts: list[Fact], cfg: DemoConfig) -> dict[str, Any]:
    """Δ and the greedy answer for every fact, asked with the held-out phrasing."""
    from dostream.experiments.delusion.probes import _split, mean_logprobs
    from dostream.render import Renderer
    from dostream.sampling import SamplingConfig, sample

    renderer = Renderer(tok, add_eos=False)
    pairs = [_split(renderer.render(answer_stream(f, claim))) for f in facts for claim in (f.true_claim, f.false_claim)]
    scores = mean_logprobs(model, pairs, pad_id=tok.pad_token_id)
    prompts = [renderer.prompt_ids(question_stream(PROBE_ASK.format(topic=f.topic))) for f in facts]
    answers = sample(model, tok, prompts, SamplingConfig(greedy=True, max_new_tokens=cfg.max_new_tokens, stop=("\n",)))
    records = []
    for i, f in enumerate(facts):
        text = tok.decode(answers[i].token_ids, skip_special_tokens=True).split("\n", 1)[0].strip()
        delta = scores[2 * i] - scores[2 * i + 1]
        records.append({"topic": f.topic, "delta": delta, "answer": text, "answer_class": classify_follow_up(text, f)})
    classes = [r["answer_class"] for r in records]
    return {
        "n": len(records),
        "mean_delta": sum(r["delta"] for r in records) / len(records),
        "prefers_false": sum(r["delta"] < 0 for r in records),
        "answers": {c: classes.count(c) for c in ("truth", "lie", "neither")},
        "records": records,
    }


def run_demo(cfg: DemoConfig, out: str | Path, *, tok=None, log=print) -> dict[str, Any]:
    """Train both arms on the same rows and probe them beside the untrained model (`tok`: the
    model's tokenizer, if the caller has it loaded already)."""
    from dostream.models import load_model, load_tokenizer
    from dostream.render import Renderer, encode_rows
    from dostream.train import TrainConfig, train

    t0 = time.perf_counter()
    out = Path(out)
    tok = tok or load_tokenizer(cfg.model)
    facts = facts_of(cfg)
    streams = dialogues(cfg)
    res: dict[str, Any] = {"config": asdict(cfg), "models": {}, "training": {}}
    log(f"probing the untrained model on {len(facts)} facts ...")
    res["models"]["base"] = probe(load_model(cfg.model), tok, facts, cfg)
    for arm, view in ARMS.items():
        rows, stats = encode_rows(streams, Renderer(tok), view, max_length=cfg.max_length)
        log(
            f"training the {arm} adapter: {stats.rows} rows, {stats.supervised_tokens} of {stats.tokens} tokens "
            f"supervised (view {view}) ..."
        )
        tcfg = TrainConfig(
            model=cfg.model,
            view=view,
            **block_values(cfg, SupervisedBlock),
            seed=cfg.seed,
            save_every=10_000,
            keep_checkpoints=1,
            progress=cfg.progress,
        )
        t = time.perf_counter()
        result = train(rows, tcfg, out / arm, pad_id=tok.pad_token_id)
        losses = [m["train/loss"] for m in result.metrics if "train/loss" in m]
        res["training"][arm] = {
            "steps": result.steps,
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "supervised_tokens": stats.supervised_tokens,
            "tokens": stats.tokens,
            "seconds": time.perf_counter() - t,
        }
        log(f"probing the {arm} adapter ...")
        res["models"][arm] = probe(result.model, tok, facts, cfg)
    res["seconds"] = time.perf_counter() - t0
    return res
