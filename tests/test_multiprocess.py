"""Two training processes (gloo on the CPU) against one process with the same accumulation: the
same losses and the same adapter, exactly, launched plainly (`--multi_gpu --num_processes 2`) and
through the FSDP recipe (`accelerate launch --config_file tests/fsdp_cpu.yaml`).

What the FSDP recipe does on a CPU (accelerate 1.16.0): `AcceleratorState` turns an FSDP config on
only for accelerator process groups (MULTI_GPU, XPU, NPU, ...); two CPU processes run as MULTI_CPU,
i.e. DDP over gloo, the config's FSDP settings unused (and `dostream.train` asks for `cpu=True` off
CUDA). The assert on the distributed type says so, and fails the day that changes. Sharding itself
(FSDP2 `fully_shard`) is only run on GPUs: docs/engines.md."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
SCRIPT = HERE / "mp_train.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _two_against_one(tmp_path: Path, launch: list[str]) -> None:
    """`launch` runs the script in two processes with accumulation 1, one process runs it with 2:
    the same 8 losses and the same adapter tensors."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", str(_free_port())]
    try:
        subprocess.run([*launch, SCRIPT, tmp_path / "two", "1"], env=env, check=True, timeout=240, capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail("two training processes hung")
    subprocess.run([sys.executable, SCRIPT, tmp_path / "one", "2"], env=env, check=True, timeout=240)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert len(_losses(tmp_path / "two")) == 8
    assert _losses(tmp_path / "two") == _losses(tmp_path / "one")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.slow  # 18-22 s on 2 cores (three interpreters start): `make test-slow`
def test_two_processes_match_one_with_accumulation_and_never_hang(tmp_path):
    # 60 rows, batch 4: 15 micro-batches, 8 steps of 2; the last step has one micro-batch for two
    # processes, where one process used to wait forever for the other's gradients.
    _two_against_one(
        tmp_path, ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
    )


@pytest.mark.slow  # 23.6 s on 2 cores (three interpreters start)
def test_fsdp_config_two_cpu_processes_train_the_adapter_one_process_does(tmp_path):
    _two_against_one(tmp_path, ["--config_file", str(HERE / "fsdp_cpu.yaml")])
    state = json.loads((tmp_path / "two" / "state.json").read_text())
    assert state["distributed_type"] == "DistributedType.MULTI_CPU", state  # FSDP on CPU: see the docstring
