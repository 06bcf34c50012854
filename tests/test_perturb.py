"""``mmpeft eval --noise``: Gaussian noise on a modality's raw input, relative to its own std."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmpeft.cli.main import main
from mmpeft.data.base import DataError
from mmpeft.data.perturb import NoisyDataset, add_noise, parse_levels
from test_cli import one_thread  # noqa: F401  (fixture)

FAST = ["data.sizes={train: 64, val: 32, test: 32}", "train.epochs=2", "train.tensorboard=false"]


def test_noise_has_the_asked_std_relative_to_the_input():
    rng = np.random.default_rng(0)
    x = (3.0 * rng.normal(size=20_000)).astype(np.float32)
    noisy = add_noise(x, 0.5, np.random.default_rng(1), "x")
    assert noisy.dtype == np.float32 and noisy.shape == x.shape
    assert (noisy - x).std() == pytest.approx(0.5 * x.std(), rel=0.03)
    t = torch.from_numpy(x)
    assert torch.is_tensor(add_noise(t, 0.5, np.random.default_rng(1), "x"))
    image = Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    noisy_image = add_noise(image, 1.0, np.random.default_rng(1), "x")
    assert noisy_image.size == image.size and noisy_image.mode == "RGB"
    assert np.abs(np.asarray(noisy_image, float) - np.asarray(image, float)).mean() > 10
    with pytest.raises(DataError, match="cannot add noise to a str input"):
        add_noise("a dog runs", 0.5, np.random.default_rng(1), "x")


def test_levels_parse_and_bad_ones_are_named():
    assert parse_levels(["image=0.5,audio=1"], "--noise") == {"image": 0.5, "audio": 1.0}
    for bad in ("image", "image=x", "=1", "image=-1"):
        with pytest.raises(DataError, match=f"--noise '{bad}'"):
            parse_levels([bad], "--noise")


def test_noisy_examples_are_reproducible_per_example():
    data = [
        {"inputs": {"a": np.zeros(4, np.float32) + i, "b": np.ones(3, np.float32)}, "id": i} for i in range(3)
    ]
    for ex in data:
        ex["inputs"]["a"][0] += 1.0  # a non-zero std
    one, two = NoisyDataset(data, {"a": 1.0}, seed=0), NoisyDataset(data, {"a": 1.0}, seed=0)
    assert np.array_equal(one[2]["inputs"]["a"], two[2]["inputs"]["a"])
    assert not np.array_equal(one[1]["inputs"]["a"], NoisyDataset(data, {"a": 1.0}, seed=1)[1]["inputs"]["a"])
    assert np.array_equal(one[1]["inputs"]["b"], data[1]["inputs"]["b"])  # other modalities untouched


def test_eval_with_noise_changes_the_metrics_and_names_unknown_modalities(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--config", "toy", "method=late_fusion", *FAST, "--output", out]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", out]) == 0
    clean = json.loads(capsys.readouterr().out)["test"]
    assert main(["eval", "--run", out, "--noise", "image=3"]) == 0
    noisy = json.loads(capsys.readouterr().out)
    assert noisy["noise"] == {"levels": {"image": 3.0}, "seed": 0}
    assert noisy["test"] != clean and all(np.isfinite(v) for v in noisy["test"].values())
    assert main(["eval", "--run", out, "--noise", "image=0"]) == 0  # level 0 is the clean input
    assert json.loads(capsys.readouterr().out)["test"] == clean
    assert main(["eval", "--run", out, "--noise", "audio=1"]) == 2
    assert "--noise names ['audio']" in capsys.readouterr().err
