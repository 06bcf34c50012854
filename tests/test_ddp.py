"""Two CPU processes (torchrun, gloo) train the toy config like one process with the global batch.

``accelerate launch --cpu`` starts one process on a single machine (multi-CPU needs MPI), so the
test launches with torchrun, which Accelerate picks up from the environment. Each process gets
half of every global batch (``epoch_batches``), so a one-process run with batch 2 x 32 sees the
same batches and its metrics must come out close (only the float order of the gradient average
differs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from mmpeft.run_config import load_run_config
from mmpeft.train import Trainer

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_toy(out: str, *args: str) -> subprocess.CompletedProcess:
    """``mmpeft train --config toy ARGS --output OUT`` on two CPU processes through torchrun."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "mmpeft.cli.main", "train", "--config", "toy", *args, "--output", out,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("method", ["lora", "uniadapter"])  # uniadapter: may_skip_params -> find_unused
def test_two_process_run_matches_one_process_with_the_global_batch(method, tmp_path):
    overrides = [f"method={method}", "train.tensorboard=false", "train.cpu=true", "train.epochs=3"]
    out = str(tmp_path / "ddp")
    result = torchrun_toy(out, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "metrics.json")) as f:
        ddp = json.load(f)
    single = Trainer(load_run_config("toy", [*overrides, "train.batch_size=64"])).fit()
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["steps"] == single["steps"] == 9  # 192 examples / (2 x 32) per step, 3 epochs
    for a, b in zip(ddp["history"], single["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val"]["accuracy"] == pytest.approx(b["val"]["accuracy"], abs=0.05)
    assert ddp["test"]["accuracy"] == pytest.approx(single["test"]["accuracy"], abs=0.05)


def launch_two_cpu_processes(tmp_path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``mmpeft train --config toy`` through ``accelerate launch`` with the shipped 2-process CPU
    config; the finished process and its metrics.json."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = os.path.join(root, "examples", "accelerate", "cpu-2-processes.yaml")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = str(tmp_path / "run")
    cmd = [
        accelerate, "launch", "--config_file", config, "--main_process_port", str(free_port()),
        "-m", "mmpeft.cli.main", "train", "--config", "toy", "train.cpu=true", "train.tensorboard=false",
        *overrides, "--output", out,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "metrics.json")) as f:
        return result, json.load(f)


def test_accelerate_launch_with_the_shipped_config_really_starts_two_processes(tmp_path):
    result, metrics = launch_two_cpu_processes(tmp_path, "train.epochs=1")
    assert metrics["world_size"] == 2 and metrics["distributed_type"] == "MULTI_CPU"
    assert result.stderr.count("INFO epoch 0") == 1  # one log, from the main process
    assert result.stdout.count('"trainable_params"') == 1  # one summary printed


def test_two_processes_with_modality_dropout_and_a_learned_placeholder(tmp_path):
    """Batches where nothing is absent leave the placeholder without gradient: DDP must not hang."""
    _, metrics = launch_two_cpu_processes(
        tmp_path, "method=late_fusion", "train.epochs=2", "train.modality_dropout={image: 0.05}"
    )
    assert metrics["world_size"] == 2
