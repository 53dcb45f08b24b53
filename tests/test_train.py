"""The training loop: golden loss, accumulation invariance, TRL parity, LoRA, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES
from safetensors.torch import load_file

from dostream.models import load_model
from dostream.render import IGNORE, Renderer, encode_rows
from dostream.stream import read_streams
from dostream.train import SupervisedNLL, TrainConfig, accumulate_step, collate, prepare_model, train

QUIET = dict(progress=False, precision="fp32")


@pytest.fixture(scope="module")
def acc():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def rows(tok):
    streams = list(read_streams(EXAMPLES / "stem_streams.jsonl")) + list(read_streams(EXAMPLES / "tutoring.jsonl"))
    rows, _ = encode_rows(streams * 3, Renderer(tok), "observational")
    return rows


def test_golden_loss_by_hand():
    """Two rows of a few tokens, different lengths (so one is padded): the loss is the mean NLL
    over the supervised positions of both rows, computed here position by position."""
    model = load_model("tiny:3")
    rows = [
        {"input_ids": [5, 17, 300, 9, 41], "labels": [IGNORE, IGNORE, 300, IGNORE, 41]},
        {"input_ids": [8, 77, 1000], "labels": [IGNORE, 77, 1000]},
    ]
    by_hand, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logits = model(torch.tensor([r["input_ids"]])).logits[0].double()
            for t in range(1, len(r["input_ids"])):
                if r["labels"][t] != IGNORE:
                    logp = logits[t - 1] - torch.logsumexp(logits[t - 1], dim=-1)
                    by_hand -= logp[r["labels"][t]].item()
                    count += 1
        nll, n = SupervisedNLL(model)(**collate(rows, [0, 1], pad_id=2))
    assert count == int(n) == 4
    assert nll.item() / int(n) == pytest.approx(by_hand / count, rel=1e-6)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_accumulation_invariance(acc, rows):
    """Batch 8 x accumulation 1, batch 1 x accumulation 8 and batch 8 run in token-budget pieces give
    the same loss and gradient."""
    assert len(rows) >= 8
    idx = list(range(8))
    results = []
    # whole; one row per micro-batch; whole but run in pieces of at most 3 rows' worth of tokens
    budget = 3 * max(len(rows[i]["input_ids"]) for i in idx)
    for micro, b in (([idx], 0), ([[i] for i in idx], 0), ([idx], budget)):
        model = prepare_model(TrainConfig(model="tiny:1", **QUIET))
        lm = SupervisedNLL(model)
        nll, tokens = accumulate_step(acc, lm, rows, micro, pad_id=2, budget=b)
        results.append((nll, tokens, _grads(model)))
    nll_a, tok_a, g_a = results[0]
    assert any(g.abs().sum() > 0 for g in g_a.values())
    for nll_b, tok_b, g_b in results[1:]:
        assert tok_a == tok_b and nll_a == pytest.approx(nll_b, rel=1e-5)
        assert g_a.keys() == g_b.keys()
        for k in g_a:  # tolerance: float32 sums in a different order
            torch.testing.assert_close(g_a[k], g_b[k], rtol=1e-4, atol=1e-7)


def test_parity_with_trl_sft_trainer(tok, rows, tmp_path):
    """TRL's SFTTrainer, given the same rows and labels, computes the same loss as dostream."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = load_model("tiny:2")
    data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows[:4]])
    args = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch).item()
        nll, n = SupervisedNLL(model)(**collate(rows, [0, 1, 2, 3], pad_id=2))
    assert int((batch["labels"] != IGNORE).sum()) == int(n)  # the same supervised positions
    assert trl_loss == pytest.approx(nll.item() / int(n), rel=1e-5)


def test_lora_changes_adapter_and_never_the_base(rows, tmp_path):
    base = {k: v.clone() for k, v in load_model("tiny:4").state_dict().items()}
    cfg = TrainConfig(model="tiny:4", max_steps=3, batch_size=2, lr=1e-2, **QUIET)
    result = train(rows, cfg, tmp_path / "run")
    state = result.model.state_dict()
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    for k, v in state.items():
        if "lora_" in k:
            continue
        name = k.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(v, base[name]), f"base weight {name} changed"
    # The adapter loads with PEFT and reproduces the trained model; merging keeps outputs.
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(load_model("tiny:4"), tmp_path / "run" / "adapter").eval()
    x = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, result.model.eval()(x).logits)
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(0 < m["mask/supervised_frac"] <= 1 and m["train/loss"] > 0 for m in metrics)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["max_steps"] == 3 and "torch" in record["environment"]["versions"]


def test_merge_writes_full_model(rows, tmp_path):
    cfg = TrainConfig(model="tiny:5", max_steps=2, batch_size=2, lr=1e-2, merge=True, **QUIET)
    result = train(rows, cfg, tmp_path / "run")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    x = torch.tensor([rows[1]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, result.model.eval()(x).logits, rtol=1e-4, atol=1e-4)


def test_one_loader_keeps_merges_or_trains_an_adapter(tmp_path):
    """`load_model(NAME, adapter=DIR)`: the adapter kept apart (frozen, eval), merged in (a plain
    model, same outputs), or loaded to train further (its LoRA weights require grad)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    trained = get_peft_model(load_model("tiny:4"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    trained.save_pretrained(tmp_path / "adapter")
    x = torch.tensor([[5, 17, 300, 9, 41]])
    with torch.no_grad():
        want = trained.eval()(x).logits
        kept = load_model("tiny:4", adapter=tmp_path / "adapter")
        assert isinstance(kept, PeftModel) and not kept.training
        assert not any(p.requires_grad for p in kept.parameters())
        torch.testing.assert_close(kept(x).logits, want)
        merged = load_model("tiny:4", adapter=tmp_path / "adapter", merge=True)
        assert not isinstance(merged, PeftModel) and not merged.training
        torch.testing.assert_close(merged(x).logits, want, rtol=1e-5, atol=1e-5)
    more = load_model("tiny:4", adapter=tmp_path / "adapter", trainable=True)
    assert {k for k, p in more.named_parameters() if p.requires_grad} == {
        k for k, p in trained.named_parameters() if p.requires_grad
    }
    plain = load_model("tiny:4", merge=True)  # no adapter: the base model
    assert not isinstance(plain, PeftModel) and not plain.training
    with pytest.raises(ValueError, match="merged adapter"):
        load_model("tiny:4", adapter=tmp_path / "adapter", merge=True, trainable=True)


def test_device_policy():
    """train() and GRPO share one policy: CUDA when available, bf16 on, off or as measured."""
    from dostream.train import bf16_faster, device_policy

    cuda = torch.cuda.is_available()
    assert device_policy("off").device.type == ("cuda" if cuda else "cpu")
    assert device_policy("on").bf16 and not device_policy("off").bf16
    assert device_policy("auto").bf16 == bf16_faster("cuda" if cuda else "cpu")
    with pytest.raises(ValueError, match="bf16"):
        device_policy("yes")


def _train_cmd(out, *extra):
    return [
        sys.executable,
        "-m",
        "dostream.cli",
        "train",
        str(EXAMPLES / "stem_streams.jsonl"),
        "--model",
        "tiny:6",
        "--out",
        str(out),
        "--view",
        "observational",
        "--batch-size",
        "1",
        "--epochs",
        "6",
        "--save-every",
        "1",
        "--lr",
        "1e-2",
        "--lora-dropout",
        "0.1",
        "--no-progress",
        "--precision",
        "fp32",
        *extra,
    ]


@pytest.mark.slow  # over 20 s on 2 cores: `make test-slow`
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    """SIGKILL mid-run, then --resume: the final adapter equals an uninterrupted run's, bit for bit
    (dropout on, so the restored RNG state matters too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(tmp_path / "a"), check=True, capture_output=True, env=env, timeout=300)

    proc = subprocess.Popen(_train_cmd(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    latest = tmp_path / "b" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step-0000004"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() < "step-0000012", "the run finished before it could be killed"
    refused = subprocess.run(_train_cmd(tmp_path / "b"), capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    subprocess.run(_train_cmd(tmp_path / "b", "--resume"), check=True, capture_output=True, env=env, timeout=300)

    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_precision_switches_between_runs_in_one_process(rows, tmp_path):
    """Methods chain several trainings in one process; each picks its own precision."""
    losses = {}
    for precision in ("bf16", "fp32"):
        cfg = TrainConfig(model="tiny:7", max_steps=1, batch_size=4, precision=precision, progress=False)
        result = train(rows[:4], cfg, tmp_path / precision)
        losses[precision] = result.metrics[0]["train/loss"]
        assert json.loads((tmp_path / precision / "config.json").read_text())["bf16"] is (precision == "bf16")
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2) and losses["bf16"] != losses["fp32"]


def test_a_run_directory_is_continued_only_on_its_own_rows_and_precision(tmp_path):
    """`--resume` on other rows is refused; a resumed run reuses its recorded bf16 decision; a
    directory holding another experiment's record is never trained into."""
    import json

    from dostream.config import RunDirError

    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}] * 4
    cfg = TrainConfig(model="tiny", batch_size=2, max_steps=1, progress=False, precision="fp32")
    train(rows, cfg, tmp_path / "run")
    other = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}] * 4
    with pytest.raises(RunDirError, match="trained on other rows"):
        train(other, cfg, tmp_path / "run", resume=True)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["bf16"] is False and len(record["data_sha256"]) == 64
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "config.json").write_text(json.dumps({"experiment": "agent", "config": {}}))
    with pytest.raises(RunDirError, match="holds a 'agent' run"):
        train(rows, cfg, tmp_path / "agent", resume=True)
    with pytest.raises(RunDirError, match="already holds a run"):
        train(rows, cfg, tmp_path / "agent")
    assert json.loads((tmp_path / "agent" / "config.json").read_text())["experiment"] == "agent"  # untouched


def test_forcing_bf16_where_it_is_emulated_warns_and_benchmarks_skip_it(monkeypatch, capsys):
    import sys

    import dostream.device as tr

    monkeypatch.setattr(tr, "bf16_speedup", lambda device_type: 0.006)  # an AVX2-only CPU
    monkeypatch.setattr(tr.torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match=r"0\.006x fp32 \(emulated\)"):
        assert tr.device_policy("on").bf16
    assert not tr.device_policy("auto").bf16
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_sampling import runnable_dtypes
    finally:
        sys.path.pop(0)
    assert runnable_dtypes(("fp32", "bf16")) == ("fp32",)
    assert "skipping bf16" in capsys.readouterr().err


def test_one_precision_vocabulary_and_its_old_spellings(tmp_path, monkeypatch, capsys):
    """`precision` (auto, fp32, bf16) is resolved in one place (`device.resolve_precision`);
    `bf16=on|off|auto` / `--bf16` and `dtype=` / `--dtype` keep working, deprecated; a run directory
    written before the rename, with the default settings, is continued."""
    import argparse
    import dataclasses

    import dostream.device as dev
    from dostream.config import RunDirError, add_dataclass_args, check_run_dir, set_argv
    from dostream.sampling import SamplingConfig

    for rate, auto in ((7.0, "bf16"), (0.006, "fp32")):  # a CPU with fast bf16, an AVX2-only one
        monkeypatch.setattr(dev, "bf16_speedup", lambda device_type, rate=rate: rate)
        assert dev.resolve_precision("auto", "cpu") == auto
    assert dev.resolve_precision("fp32", "cuda") == "fp32" and dev.torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="resolve it first"):
        dev.torch_dtype("auto")
    with pytest.raises(ValueError, match="precision must be one of"):
        dev.resolve_precision("on", "cpu")

    with pytest.warns(DeprecationWarning, match="use precision='bf16'"):
        cfg = TrainConfig(model="tiny", bf16="on")
    assert cfg.precision == "bf16" and cfg.bf16 == "on"
    with pytest.warns(DeprecationWarning):
        assert SamplingConfig(dtype="fp16").precision == "fp16"
    with pytest.raises(TypeError, match="pass only precision="):
        TrainConfig(bf16="on", precision="fp32")
    p = argparse.ArgumentParser()
    add_dataclass_args(p, TrainConfig)
    assert "--bf16" not in p.format_help() and p.parse_args([]).precision == "auto"
    assert p.parse_args(["--bf16", "off"]).precision == "fp32"
    assert "--bf16 is deprecated: use --precision fp32" in capsys.readouterr().err
    assert p.parse_args(set_argv(TrainConfig, ["bf16=on"])).precision == "bf16"

    old = dataclasses.asdict(TrainConfig(model="tiny"))
    old["bf16"] = {"auto": "auto", "bf16": "on", "fp32": "off"}[old.pop("precision")]
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "train", "config": old}))
    assert check_run_dir(tmp_path, TrainConfig(model="tiny"), experiment="train")
    with pytest.raises(RunDirError, match="precision: 'auto' -> 'fp32'"):
        check_run_dir(tmp_path, TrainConfig(model="tiny", precision="fp32"), experiment="train")
