"""The trainer on the toy config: it learns, stops on a non-finite loss, and prefix caching is exact."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mmpeft.run_config import load_run_config
from mmpeft.train import Trainer, TrainingError
from mmpeft.train.cache import CacheError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest single-threaded (and do not fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy(*overrides: str) -> dict:
    return load_run_config("toy", ["train.tensorboard=false", "train.progress=false", *overrides])


def test_toy_run_learns_and_writes_its_outputs(tmp_path):
    out = str(tmp_path / "run")
    metrics = Trainer(toy("method=lora", "train.tensorboard=true", "train.epochs=4"), out).fit()
    val = [h["val"]["accuracy"] for h in metrics["history"]]
    assert len(val) == 4 and metrics["steps"] == 4 * 6  # 192 examples / batch 32 = 6 steps per epoch
    assert max(val) > val[0] + 0.05, val
    assert metrics["val"]["accuracy"] == max(val)  # model selection keeps the best epoch
    assert metrics["test"]["accuracy"] > 0.5  # 3 classes: chance is 1/3
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["test"] == metrics["test"]
    assert saved["peak_memory_kind"] in ("cpu_ru_maxrss", "cuda_max_memory_allocated")
    assert saved["peak_memory_mb"] > 0 and saved["samples_per_s"] > 0
    assert set(saved["parameters"]["lora"]) == {"text", "image"}
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    assert os.listdir(os.path.join(out, "tensorboard"))


def test_non_finite_loss_stops_naming_step_and_batch():
    trainer = Trainer(toy("method=linear", "train.checkpoint=false"))
    real_loss, calls = trainer.task.loss, []

    def loss(outputs, batch):
        calls.append(1)
        value = real_loss(outputs, batch)
        return value * float("nan") if len(calls) == 8 else value

    trainer.task.loss = loss
    # 6 batches per epoch: the 8th loss is optimizer step 8, epoch 1, batch 1 of that epoch
    with pytest.raises(
        TrainingError,
        match=r"non-finite loss \(nan\) at step 8 \(epoch 1, batch 1 of the epoch counting from 0",
    ):
        trainer.fit()


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.methods=[{name: lora, r: 4, layers: [-1]}]"],  # hooks inside the last block
        ["method=pmf"],  # layer modules replacing the last blocks
        ["method=wander"],  # fusion after the last block: the whole encoder stack is cached
    ],
    ids=["lora_last", "pmf", "wander"],
)
def test_prefix_cache_gives_the_same_metrics(overrides):
    plain = Trainer(toy(*overrides, "train.epochs=2")).fit()
    cached = Trainer(toy(*overrides, "train.epochs=2", "train.prefix_cache=true")).fit()
    assert cached["prefix_cache"]["step"] > 0 and plain["prefix_cache"] is None
    assert cached["val"] == plain["val"]
    assert cached["test"] == plain["test"]
    for a, b in zip(cached["history"], plain["history"], strict=True):
        assert a["val"] == b["val"]
        # batches are re-padded, so the loss may differ in the last bits of float32
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)


def test_prefix_cache_refuses_a_model_that_trains_its_embeddings():
    with pytest.raises(CacheError, match="frozen prefix"):
        Trainer(toy("method=full", "train.prefix_cache=true")).fit()


def test_prefix_cache_from_the_first_block_caches_the_embeddings():
    plain = Trainer(toy("method=lora", "train.epochs=1")).fit()
    cached = Trainer(toy("method=lora", "train.epochs=1", "train.prefix_cache=true")).fit()
    assert cached["prefix_cache"]["step"] == 0 and cached["test"] == plain["test"]


def test_gradient_accumulation_matches_a_larger_batch():
    big = Trainer(toy("method=linear", "train.epochs=2")).fit()
    accumulated = Trainer(
        toy("method=linear", "train.epochs=2", "train.batch_size=16", "train.gradient_accumulation_steps=2")
    ).fit()
    assert accumulated["steps"] == big["steps"]
    for a, b in zip(accumulated["history"], big["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val"]["accuracy"] == pytest.approx(b["val"]["accuracy"], abs=1 / 64 + 1e-9)


def test_max_steps_and_early_stopping():
    short = Trainer(toy("method=linear", "train.max_steps=3")).fit()
    assert short["steps"] == 3 and len(short["history"]) == 1  # a partial epoch is still evaluated
    # a learning rate this small cannot improve accuracy: patience 1 stops after the second epoch
    stopped = Trainer(toy("method=linear", "train.epochs=6", "train.lr=1e-9", "train.patience=1")).fit()
    assert stopped["stopped_early"] and stopped["epochs"] == 2 and stopped["best_epoch"] == 0
