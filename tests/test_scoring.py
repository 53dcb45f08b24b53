"""Log-probs at chosen positions (dostream.scoring): what the training loss, GRPO, the delusion
probe and the rule probe all score with."""

import pytest
import torch

from dostream.models import tiny_model
from dostream.scoring import logits_at, logprobs_at, target_logprobs

IDS = [[5, 17, 300, 9, 41, 2], [8, 77, 1000, 2, 2, 2]]  # the second row padded with 2
MASK = [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
SCORE = [[True, False, True, False, True, True], [True, True, True, False, False, False]]


def _by_hand(model, ids, mask, score):
    """Each row alone, unpadded, through the whole model; position t scored from the logits at t-1."""
    out = []
    with torch.no_grad():
        for row, m, s in zip(ids, mask, score):
            n = sum(m)
            logits = model(torch.tensor([row[:n]])).logits[0].double()
            logp = logits - torch.logsumexp(logits, -1, keepdim=True)
            out += [logp[t - 1, row[t]].item() for t in range(1, n) if s[t]]
    return out


def test_logprobs_at_match_a_full_forward_row_by_row():
    """Scored tokens come back in row-major order; position 0 is never scored (nothing precedes it)."""
    model = tiny_model(3).eval()
    ids, mask, score = torch.tensor(IDS), torch.tensor(MASK), torch.tensor(SCORE)
    with torch.no_grad():
        got = logprobs_at(model, ids, mask, score)
    assert got.dtype == torch.float32 and got.shape == (5,)  # row 0: 2, 4, 5; row 1: 1, 2
    assert got.tolist() == pytest.approx(_by_hand(model, IDS, MASK, SCORE), abs=1e-5)


def test_vocabulary_projection_runs_only_at_scored_positions():
    model = tiny_model(3).eval()
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        logits = logits_at(model, torch.tensor(IDS), torch.tensor(MASK), torch.tensor(SCORE))
    assert rows == [5] and logits.shape == (5, model.config.vocab_size)


def test_peft_model_scores_with_its_adapter_unless_disabled():
    from peft import LoraConfig, get_peft_model

    base = tiny_model(4).eval()
    plain = _by_hand(base, IDS, MASK, SCORE)
    model = get_peft_model(tiny_model(4), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    args = torch.tensor(IDS), torch.tensor(MASK), torch.tensor(SCORE)
    with torch.no_grad():
        adapted = logprobs_at(model, *args).tolist()
        with model.disable_adapter():
            disabled = logprobs_at(model, *args).tolist()
    assert adapted == pytest.approx(_by_hand(model, IDS, MASK, SCORE), abs=1e-5)
    assert adapted != pytest.approx(plain, abs=1e-5)
    assert disabled == pytest.approx(plain, abs=1e-5)


@pytest.mark.parametrize("field", ["final_logit_softcapping", "logit_scale"])
def test_models_that_transform_logits_after_the_head_take_the_full_forward(field):
    model = tiny_model(3).eval()
    setattr(model.config, field, 2.0)
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append(out.logits.shape))
    with torch.no_grad():
        got = logprobs_at(model, torch.tensor(IDS), torch.tensor(MASK), torch.tensor(SCORE))
    assert calls == [(2, 6, model.config.vocab_size)]  # the model's own forward, every position
    assert got.tolist() == pytest.approx(_by_hand(model, IDS, MASK, SCORE), abs=1e-5)


def test_a_model_without_a_separate_head_is_scored_from_its_logits():
    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]).log()

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.table[input_ids]})

    ids = torch.tensor([[0, 1, 1, 2]])
    got = logprobs_at(Bigram(), ids, torch.ones_like(ids), torch.tensor([[False, True, False, True]]))
    assert got.tolist() == pytest.approx([torch.tensor(0.25).log().item(), torch.tensor(0.1).log().item()])


def test_target_logprobs_are_float32_log_softmax_of_the_target():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0)).bfloat16()
    targets = torch.tensor([6, 0, 3])
    got = target_logprobs(logits, targets)
    want = torch.log_softmax(logits.float(), -1)[torch.arange(3), targets]
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_training_loss_is_minus_the_summed_logprobs_of_the_supervised_tokens():
    """train.SupervisedNLL sums the same quantity with the fused cross-entropy."""
    from dostream.render import IGNORE
    from dostream.train import SupervisedNLL

    model = tiny_model(3).eval()
    ids, mask, score = torch.tensor(IDS), torch.tensor(MASK), torch.tensor(SCORE)
    labels = torch.where(score & mask.bool(), ids, IGNORE)
    with torch.no_grad():
        nll, n = SupervisedNLL(model)(ids, mask, labels)
        logp = logprobs_at(model, ids, mask, score)
    assert int(n) == len(logp) == 5
    assert nll.item() == pytest.approx(-logp.sum().item(), rel=1e-6)
