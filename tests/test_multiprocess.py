"""Two training processes (gloo on the CPU) against one process with the same accumulation."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("mp_train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 18-22 s on 2 cores (three interpreters start): `make test-slow`
def test_two_processes_match_one_with_accumulation_and_never_hang(tmp_path):
    # 60 rows, batch 4: 15 micro-batches, 8 steps of 2; the last step has one micro-batch for two
    # processes, where one process used to wait forever for the other's gradients.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    try:
        subprocess.run([*launch, SCRIPT, tmp_path / "two", "1"], env=env, check=True, timeout=240, capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail("two training processes hung")
    subprocess.run([sys.executable, SCRIPT, tmp_path / "one", "2"], env=env, check=True, timeout=240)
    assert len(_losses(tmp_path / "two")) == 8
    assert _losses(tmp_path / "two") == _losses(tmp_path / "one")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
