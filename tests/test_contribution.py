"""Modality contribution: test scores with one modality's input replaced by another example's."""

from __future__ import annotations

import pytest

from mmpeft.run_config import load_run_config
from mmpeft.train import Trainer
from mmpeft.train.contribution import derangement
from test_trainer import one_thread  # noqa: F401  (fixture)


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_derangement_moves_every_example(n):
    perm = derangement(n, seed=n)
    assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))


@pytest.mark.parametrize("cache", ["false", "true"])
def test_a_fusion_model_loses_accuracy_without_either_modality(cache):
    config = load_run_config(
        "toy",
        ["method=late_fusion", "train.epochs=8", "train.tensorboard=false", f"train.prefix_cache={cache}",
         "train.cache_dir=''"],
    )  # fmt: skip
    metrics = Trainer(config).fit()
    full = metrics["test"]["accuracy"]
    replaced = metrics["test_replaced"]
    assert set(replaced) == {"text", "image"}
    for m in replaced:  # the synthetic label needs both modalities
        assert replaced[m]["accuracy"] < full - 0.1, (m, replaced[m], full)


def test_no_contribution_for_one_modality_or_when_switched_off():
    config = load_run_config("toy", ["method=linear", "train.epochs=1", "train.modality_contribution=false"])
    assert Trainer(config).fit()["test_replaced"] is None
