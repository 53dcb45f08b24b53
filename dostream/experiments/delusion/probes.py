"""The delusion experiment's probes, and what they measure: on every fact of a set,

(a) the greedy Agent follow-up after the User states the truth, and after the User states the lie,
    classified (`CLASSES`) as naming the true value, the false one, or neither;
(b) Δ = mean per-token log p(true claim) − mean per-token log p(false claim), each scored as the
    Agent's answer to "Tell me about <topic>." under both scorers (`SCORERS`).

`run.py` probes every model with `probe_model`; the report reads the records through `summarise`.
"""

from __future__ import annotations

import torch

from dostream.envs.tutor.env import Fact, answer_stream, classify_follow_up, prompt_stream

SETS = ("seen", "lie_only", "held_out")
SET_NAMES = {"seen": "seen (corrected)", "lie_only": "held-out, lies only", "held_out": "held-out, unseen"}
CLASSES = ("truth", "lie", "neither")
# The two Δ scorers; a probe record holds `delta` (dostream's) and `delta_notebook`.
SCORERS = {
    "dostream": "every answer token scored; prompt and answer tokenised apart, as in training",
    "notebook": "the notebook's: prompt and prompt + answer tokenised as text, scored from the prompt's "
    "length on, so the first answer token is dropped",
}
DELTA_KEY = {"dostream": "delta", "notebook": "delta_notebook"}


@torch.inference_mode()
def mean_logprobs(
    model, pairs: list[tuple[list[int], list[int]]], *, batch_size: int = 32, pad_id: int = 0, progress: bool = False
) -> list[float]:
    """Mean per-token log-probability of each continuation given its prompt: for a pair
    (prompt, cont), (1/|cont|) Σ_j log p(cont_j | prompt, cont_<j)."""
    from tqdm.auto import tqdm

    from dostream.scoring import logprobs_at

    if not all(p and c for p, c in pairs):
        raise ValueError("scoring needs a non-empty prompt and continuation")
    out: list[float] = []
    for k in tqdm(range(0, len(pairs), batch_size), desc="score", disable=not progress, leave=False):
        chunk = pairs[k : k + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        cont = torch.zeros((len(chunk), width), dtype=torch.bool)  # the continuation's tokens are scored
        for b, (p, c) in enumerate(chunk):
            ids[b, : len(p) + len(c)] = torch.tensor(p + c)
            mask[b, : len(p) + len(c)] = 1
            cont[b, len(p) : len(p) + len(c)] = True
        token_logp = logprobs_at(model, ids, mask, cont)
        out += [part.mean().item() for part in token_logp.split([len(c) for _, c in chunk])]
    return out


def _split(rendered) -> tuple[list[int], list[int]]:
    """A rendered answer stream -> (prompt ids, the agent's ids)."""
    k = rendered.authors.index("agent")
    if any(a != "agent" for a in rendered.authors[k:]):
        raise ValueError("the agent's answer must end the stream")
    return rendered.input_ids[:k], rendered.input_ids[k:]


def notebook_pair(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """The notebook's Δ pair: the ids of `prompt + answer` split at the length of the ids of `prompt`.

    The prompt ends in "Agent: ", whose space joins the answer's first word as one token
    (":", " The" rather than ":", " ", "The"), so the prompt's ids are not a prefix of the whole's
    and the split falls one token late: the first answer token is context, never scored."""
    n = len(tok(prompt)["input_ids"])
    full = tok(prompt + answer)["input_ids"]
    return full[:n], full[n:]


def delta_pairs(tok, facts: list[Fact]) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Per scorer, the (prompt, answer) id pairs of every fact's true then false claim, as the
    Agent's answer to "Tell me about <topic>." (`answer_stream`)."""
    from dostream.render import Renderer

    renderer = Renderer(tok, add_eos=False)
    streams = [answer_stream(f, claim) for f in facts for claim in (f.true_claim, f.false_claim)]
    return {
        "dostream": [_split(renderer.render(s)) for s in streams],
        "notebook": [
            notebook_pair(tok, "".join(seg.text for seg in s.segments[:-1]), s.segments[-1].text) for s in streams
        ],
    }


def probe_model(model, tok, sets: dict[str, list[Fact]], cfg) -> list[dict]:
    """Both probes on every fact of every set: one record per fact. `cfg` is the run's
    `DelusionConfig` (`probe_batch_size`, `progress`, `follow_max_tokens`, `follow_dtype`)."""
    from tqdm.auto import tqdm

    from dostream.render import Renderer
    from dostream.sampling import SamplingConfig, sample

    renderer = Renderer(tok, add_eos=False)
    facts = [(name, f) for name in SETS for f in sets[name]]
    pairs = delta_pairs(tok, [f for _, f in facts])
    scored = mean_logprobs(
        model,
        pairs["dostream"] + pairs["notebook"],
        batch_size=cfg.probe_batch_size,
        pad_id=tok.pad_token_id,
        progress=cfg.progress,
    )
    scores = {"dostream": scored[: len(pairs["dostream"])], "notebook": scored[len(pairs["dostream"]) :]}
    prompts = [renderer.prompt_ids(prompt_stream(claim)) for _, f in facts for claim in (f.true_claim, f.false_claim)]
    # Greedy decoding in bf16 (a cast copy): 2.6x faster on this CPU than fp32; Δ is scored in fp32.
    scfg = SamplingConfig(
        greedy=True,
        max_new_tokens=cfg.follow_max_tokens,
        stop=("\n",),
        batch_size=cfg.probe_batch_size,
        precision=cfg.follow_dtype,
    )
    samples = []
    for k in tqdm(
        range(0, len(prompts), cfg.probe_batch_size), desc="follow-ups", disable=not cfg.progress, leave=False
    ):
        samples += sample(model, tok, prompts[k : k + cfg.probe_batch_size], scfg)
    records = []
    for i, (name, f) in enumerate(facts):
        texts = [
            tok.decode(s.token_ids, skip_special_tokens=True).split("\n", 1)[0].strip()
            for s in samples[2 * i : 2 * i + 2]
        ]
        t, fl = scores["dostream"][2 * i : 2 * i + 2]
        nt, nf = scores["notebook"][2 * i : 2 * i + 2]
        records.append(
            {
                "set": name,
                "topic": f.topic,
                "logp_true": t,
                "logp_false": fl,
                "delta": t - fl,
                "logp_true_notebook": nt,
                "logp_false_notebook": nf,
                "delta_notebook": nt - nf,
                # Where true and false differ in the token the notebook's scorer drops, it cannot see it.
                "notebook_drops_difference": pairs["notebook"][2 * i][0] != pairs["notebook"][2 * i + 1][0],
                "after_truth": texts[0],
                "after_truth_class": classify_follow_up(texts[0], f),
                "after_lie": texts[1],
                "after_lie_class": classify_follow_up(texts[1], f),
            }
        )
    return records


def summarise(records: list[dict], name: str, scorer: str = "dostream") -> dict:
    """Per fact set: mean Δ under `scorer`, how many facts prefer the lie (Δ < 0), follow-up class counts."""
    rs = [r for r in records if r["set"] == name]
    key = DELTA_KEY[scorer]
    return {
        "n": len(rs),
        "mean_delta": sum(r[key] for r in rs) / len(rs) if rs else float("nan"),
        "prefers_lie": sum(r[key] < 0 for r in rs),
        "after_truth": {c: sum(r["after_truth_class"] == c for r in rs) for c in CLASSES},
        "after_lie": {c: sum(r["after_lie_class"] == c for r in rs) for c in CLASSES},
    }
