"""Sharded training (train.fsdp) on two CPU processes with gloo: FSDP2 shards the frozen blocks.

The adapters stay whole, so a two-process FSDP run with half of every global batch per process
must train like one process with the whole batch (the same losses up to float order), save an
adapter of the same layout, and resume exactly after a kill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mmpeft.run_config import load_run_config
from mmpeft.train import Trainer
from test_ddp import free_port, torchrun_toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metrics_of(out: str) -> dict:
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


COMMON = ["train.tensorboard=false", "train.cpu=true", "train.epochs=3"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "pmf"])  # pmf: its query stage runs a block's tail
def test_two_process_fsdp_trains_like_one_process_and_saves_the_same_adapter(method, tmp_path):
    out = str(tmp_path / "fsdp")
    result = torchrun_toy(out, f"method={method}", "train.fsdp=true", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = metrics_of(out)
    fsdp = sharded["fsdp"]
    assert sharded["world_size"] == 2 and (fsdp["sharded_blocks"], fsdp["whole_blocks"]) == (6, 0)
    assert fsdp["param_mb_per_process"] < 0.8 * fsdp["param_mb"]  # the blocks are most of the toy pair
    single_out = str(tmp_path / "single")
    single = Trainer(
        load_run_config("toy", [f"method={method}", *COMMON, "train.batch_size=64"]), single_out
    ).fit()
    assert single["fsdp"] is None and sharded["steps"] == single["steps"] == 9
    for a, b in zip(sharded["history"], single["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    a = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(single_out, "adapter", "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_accelerate_launch_with_the_fsdp_config_shards_and_a_killed_run_resumes_exactly(tmp_path):
    config = os.path.join(ROOT, "examples", "accelerate", "fsdp-cpu-2-processes.yaml")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")

    def launch(out: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [
            accelerate, "launch", "--config_file", config, "--main_process_port", str(free_port()),
            "-m", "mmpeft.cli.main", "train", "--config", "toy", "method=uniadapter", *COMMON,
            "train.prefix_cache=true", "train.cache_dir=''", "--output", out, *extra,
        ]  # fmt: skip
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )

    whole = str(tmp_path / "whole")
    result = launch(whole)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = metrics_of(whole)
    assert expected["fsdp"]["sharded_blocks"] > 0 and expected["world_size"] == 2
    killed = str(tmp_path / "killed")
    assert launch(killed, "train.stop_after_steps=4").returncode != 0
    result = launch(killed, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = metrics_of(killed)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in expected["history"]]
    assert resumed["test"] == expected["test"]


def test_an_fsdp_launch_keeps_accelerate_from_wrapping_and_train_fsdp_alone_sets_nothing(monkeypatch):
    from mmpeft.run_config import TrainConfig
    from mmpeft.train.setup import make_accelerator
    from mmpeft.train.sharding import fsdp_requested

    monkeypatch.setenv("MMPEFT_FSDP", "false")  # set, so that monkeypatch restores it afterwards
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    make_accelerator(TrainConfig(fsdp=True, cpu=True))
    assert os.environ["MMPEFT_FSDP"] == "false"  # the next run of this process is not sharded unasked
    assert fsdp_requested(TrainConfig(fsdp=True)) and not fsdp_requested(TrainConfig())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    assert fsdp_requested(TrainConfig())
    make_accelerator(TrainConfig(cpu=True))
    assert os.environ["ACCELERATE_USE_FSDP"] == "false" and os.environ["MMPEFT_FSDP"] == "true"
    assert fsdp_requested(TrainConfig())
