"""The FSDP recipe (`accelerate launch --config_file tests/fsdp_cpu.yaml`) over 2 CPU processes
(gloo) against one process with the same accumulation: the same losses and adapter, exactly.

What it shows on a CPU (accelerate 1.16.0): `AcceleratorState` turns an FSDP config on only for
accelerator process groups (MULTI_GPU, XPU, NPU, ...); two CPU processes run as MULTI_CPU, i.e.
DDP over gloo, the config's FSDP settings unused (and `dostream.train` asks for `cpu=True` off
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 23.6 s on 2 cores (three interpreters start)
def test_fsdp_config_two_cpu_processes_train_the_adapter_one_process_does(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(HERE / "fsdp_cpu.yaml")]
    launch += ["--main_process_port", str(_free_port())]
    script = str(HERE / "fsdp_train.py")
    try:
        subprocess.run([*launch, script, tmp_path / "two", "1"], env=env, check=True, timeout=240, cwd=HERE)
    except subprocess.TimeoutExpired:
        pytest.fail("two training processes hung")
    subprocess.run([sys.executable, script, tmp_path / "one", "2"], env=env, check=True, timeout=240, cwd=HERE)
    state = json.loads((tmp_path / "two" / "state.json").read_text())
    assert state["distributed_type"] == "DistributedType.MULTI_CPU", state  # FSDP on CPU: see the docstring
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert len(_losses(tmp_path / "two")) == 8 and _losses(tmp_path / "two") == _losses(tmp_path / "one")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
