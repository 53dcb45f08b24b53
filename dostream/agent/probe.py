"""The rule probe: does the agent know each support service's rule, and where (where it acts, or
only where the service speaks)? The agent report shows it for the base model and every final adapter.
"""

from __future__ import annotations

from dostream.envs.support import FRAMED, ITEMS, SupportTask, prompt_segments


def rule_probe(model, tok, tasks: list[SupportTask], reply: str = "refusal") -> dict[str, int]:
    """Does the model know each service's rule, and where? For every task, the six kinds of
    detail are scored by the mean log-prob of their words (a) where the agent acts, after "I have
    ready the user's", and (b) where the service speaks, after the start of its reply in the
    environment's style. Returns how many tasks rank the required kind first in each frame
    (chance: one in six), and `n`."""
    import torch

    from dostream.sampling import cache_kwarg
    from dostream.scoring import target_logprobs

    device, cache_kw = next(model.parameters()).device, cache_kwarg(model)
    kinds = list(ITEMS)
    words = {
        "act": [" " + ITEMS[k].words for k in kinds],  # the agent's frame; `framed` replies use it too
        "reply": [" " + (ITEMS[k].words if reply == "framed" else ITEMS[k].name) for k in kinds],
    }
    # The six continuations of a frame are the same for every task, and so are their padded ids.
    rows = {f: [tok(c, add_special_tokens=False)["input_ids"] for c in cs] for f, cs in words.items()}
    width = {f: max(map(len, rs)) for f, rs in rows.items()}
    ids = {f: torch.tensor([r + [0] * (width[f] - len(r)) for r in rs], device=device) for f, rs in rows.items()}
    words_at = {
        f: torch.tensor([[j < len(r) for j in range(width[f])] for r in rs], device=device) for f, rs in rows.items()
    }
    opener = FRAMED if reply == "framed" else "I can't help without"
    hits = {"act": 0, "reply": 0, "n": len(tasks)}
    for task in tasks:
        ctx = "".join(s.text for s in prompt_segments(task))
        for frame, prefix in (("act", ctx), ("reply", f"{ctx} call details.\n{task.service}: {opener}")):
            # The prefix runs once; its cache is repeated for the six continuations.
            p, rs = tok(prefix, add_special_tokens=False)["input_ids"], rows[frame]
            mask = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width[frame] - len(r)) for r in rs], device=device)
            with torch.no_grad():
                head = model(input_ids=torch.tensor([p], device=device), use_cache=True)
                cache = head.cache if getattr(head, "cache", None) is not None else head.past_key_values
                cache.batch_repeat_interleave(len(rs))
                tail = model(input_ids=ids[frame], attention_mask=mask, **{cache_kw: cache}).logits
            logits = torch.cat([head.logits[:, -1:].expand(len(rs), 1, -1), tail[:, :-1]], 1)  # predicting the words
            logp = target_logprobs(logits[words_at[frame]], ids[frame][words_at[frame]])
            scores = [part.mean().item() for part in logp.split([len(r) for r in rs])]
            hits[frame] += kinds[max(range(len(scores)), key=scores.__getitem__)] == task.required
    return hits
