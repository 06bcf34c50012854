"""``mmpeft bench`` over several seeds (mean ± std, per-seed raw numbers, failures counted), per-method
overrides and a run config's ``recipes``."""

from __future__ import annotations

import json
import os
import statistics

import pytest
import yaml

from mmpeft.cli.main import main
from mmpeft.compare import format_table, summarize
from mmpeft.run_config import apply_recipe, load_run_config, validate_run_config

FAST = ["data.sizes={train: 48, val: 32, test: 32}", "train.epochs=1", "train.tensorboard=false"]


def test_bench_over_seeds_reports_mean_std_and_every_seed(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--config", "toy", "--methods", "linear,lora", "--seeds", "0,1", *FAST]
    assert main([*args, "train.checkpoint=false", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["linear", "lora"]
    for r in rows:
        assert r["seeds"] == [0, 1] and r["n_seeds"] == 2 and r["failed_seeds"] == [] and not r["failed"]
        assert [run["seed"] for run in r["runs"]] == [0, 1]
        per_seed = {}
        for run in r["runs"]:  # every seed's raw numbers are its own run's metrics.json
            metrics = json.loads((out / r["method"] / f"seed{run['seed']}" / "metrics.json").read_text())
            assert metrics["trainable_params"] == r["trainable_params"]
            assert run["test"] == metrics["test"]["accuracy"] and run["val"] == metrics["val"]["accuracy"]
            assert run["test_metrics"] == metrics["test"]
            assert run["peak_memory_mb"] == metrics["peak_memory_mb"]
            per_seed[run["seed"]] = metrics
        config = yaml.safe_load((out / r["method"] / "seed1" / "config.yaml").read_text())
        assert config["train"]["seed"] == 1
        for split in ("val", "test"):
            values = [per_seed[s][split]["accuracy"] for s in (0, 1)]
            assert r[split] == pytest.approx(statistics.mean(values))
            assert r[f"{split}_std"] == pytest.approx(statistics.stdev(values))
        times = [m["train_time_s"] for m in per_seed.values()]
        assert r["train_time_s"] == pytest.approx(statistics.mean(times))
        line = next(li for li in printed.splitlines() if li.startswith(f"| {r['method']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "2" and cells[2] == f"{r['trainable_params']:,}"
        assert cells[-1] == f"{r['test']:.3f} ± {r['test_std']:.3f}"
        assert cells[-2] == f"{r['val']:.3f} ± {r['val_std']:.3f}"
    header = "| method | seeds | trainable params | % of model | peak RSS (MB) | train time (s) |"
    assert header in printed and "mean ± sample std" in printed
    assert (out / "results.md").read_text().strip() in printed
    assert (out / "results.png").stat().st_size > 0


def test_bench_marks_a_failing_method_and_fails(tmp_path, capsys):
    out = tmp_path / "bench"
    overrides = tmp_path / "per-method.yaml"
    overrides.write_text("wander: [train.stop_after_steps=1, model.methods.0.k=4]\n")
    args = ["bench", "--config", "toy", "--methods", "linear,wander", "--seeds", "0,1", *FAST]
    assert main([*args, "--method-overrides", str(overrides), "--output", str(out)]) == 1
    printed = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    assert not rows[0]["failed"] and rows[0]["n_seeds"] == 2
    wander = rows[1]
    assert wander["failed"] and wander["n_seeds"] == 0 and wander["failed_seeds"] == [0, 1]
    assert [run["failed"] for run in wander["runs"]] == [True, True]
    assert "| wander | 0/2 (seeds 0, 1 failed) | failed |" in printed
    assert (out / "results.png").stat().st_size > 0  # the plot still shows the others


def test_a_partly_failed_method_counts_its_failed_seeds():
    def run(seed, test):
        return {"seed": seed, "metric": "accuracy", "trainable_params": 10, "trainable_percent": 1.0,
                "peak_memory_kind": "cpu rss", "peak_memory_mb": 100.0, "train_time_s": 2.0,
                "cache_time_s": 0.5, "samples_per_s": 1.0, "wall_time_s": 3.0, "val": test, "test": test}  # fmt: skip

    row = summarize("lora", [run(0, 0.9), {"seed": 1, "failed": True, "exit_code": 1}, run(2, 0.7)])
    assert row["n_seeds"] == 2 and row["failed_seeds"] == [1] and not row["failed"]
    assert row["test"] == pytest.approx(0.8)
    assert row["test_std"] == pytest.approx(statistics.stdev([0.9, 0.7]))
    assert len(row["runs"]) == 3
    table = format_table([row], chance=0.5, seeds=True)
    assert "| lora | 2/3 (seed 1 failed) | 10 | 1.000 | 100 | 2.5 | 0.800 ± 0.141 | 0.800 ± 0.141 |" in table
    assert "chance accuracy is about 0.5" in table
    one = summarize("lora", [run(0, 0.9)])  # one seed: just the value, and the old table
    assert one["test"] == 0.9 and one["test_std"] is None
    assert format_table([one]).splitlines()[2] == "| lora | 10 | 1.000 | 100 | 2.5 | 0.900 | 0.900 |"


def recipe_config(tmp_path) -> str:
    config = load_run_config("toy")
    config["recipes"] = {"lora": ["model.methods.0.r=2", "train.lr=0.01"], "wander": ["model.methods.0.k=4"]}
    path = tmp_path / "recipes.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_recipes_apply_to_the_chosen_method_and_the_command_line_wins(tmp_path):
    path = recipe_config(tmp_path)
    config = load_run_config(path, ["method=lora"])
    assert config["model"]["methods"] == [{"name": "lora", "r": 2}] and config["train"]["lr"] == 0.01
    assert "recipes" not in config
    validate_run_config(config)
    # explicit overrides win over the recipe, before or after method=NAME
    config = load_run_config(path, ["method=lora", "model.methods.0.r=3"])
    assert config["model"]["methods"] == [{"name": "lora", "r": 3}] and config["train"]["lr"] == 0.01
    config = load_run_config(path, ["train.lr=0.5", "method=lora"])
    assert config["model"]["methods"][0]["r"] == 2 and config["train"]["lr"] == 0.5
    # an override that method=NAME replaced stays replaced
    config = load_run_config(path, ["model.methods.0.r=3", "method=wander"])
    assert config["model"]["methods"] == [{"name": "wander", "k": 4}]
    # the config's own single method gets its recipe too; a method without one gets nothing
    assert load_run_config(path)["model"]["methods"] == [{"name": "lora", "r": 2}]
    config = load_run_config(path, ["method=linear"])
    assert config["model"]["methods"] == [{"name": "linear"}] and config["train"]["lr"] == 0.003
    assert "recipes" not in config


def test_apply_recipe_needs_exactly_that_one_method(tmp_path):
    config = {"model": {"methods": [{"name": "lora"}, {"name": "wander"}]}, "recipes": {"lora": ["x=1"]}}
    assert not apply_recipe(config) and "recipes" not in config and "x" not in config
    config = {"model": {"methods": [{"name": "lora"}]}, "recipes": {"lora": ["x=1"]}}
    assert not apply_recipe(config, "wander") and "x" not in config
    config = {"model": {"methods": [{"name": "lora"}]}, "recipes": {"lora": ["x=1"]}}
    assert apply_recipe(config, "lora") and config["x"] == 1


def test_bad_recipes_name_the_problem(tmp_path, capsys):
    config = load_run_config("toy")
    config["recipes"] = {"lorra": ["model.methods.0.r=2"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    assert "did you mean 'lora'" in capsys.readouterr().err
    config["recipes"] = {"lora": ["method=wander"]}
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    assert "may not change the method" in capsys.readouterr().err


def test_train_and_bench_use_the_recipe(tmp_path, capsys):
    path = recipe_config(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--config", path, "method=lora", *FAST, "--output", str(run)]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["methods"][0]["r"] == 2
    per_method = tmp_path / "per-method.yaml"
    per_method.write_text("lora: [model.methods.0.r=3]\n")
    out = tmp_path / "bench"
    args = ["bench", "--config", path, "--methods", "lora", *FAST, "--method-overrides", str(per_method)]
    assert main([*args, "--output", str(out)]) == 0
    saved = yaml.safe_load((out / "lora" / "config.yaml").read_text())
    assert saved["model"]["methods"][0]["r"] == 3 and saved["train"]["lr"] == 0.01
    assert json.loads((out / "results.json").read_text())[0]["attached"] == ["lora"]
    per_method.write_text("wander: [model.methods.0.k=4]\n")  # not one of --methods
    assert main([*args, "--output", str(tmp_path / "bench2")]) == 2
    assert "'wander' is not in --methods" in capsys.readouterr().err


def test_bench_run_again_keeps_the_runs_that_finished(tmp_path, capsys):
    out = str(tmp_path / "bench")
    args = ["bench", "--config", "toy", "--methods", "linear", "--seeds", "0", "--output", out,
            "train.epochs=1", "train.tensorboard=false"]  # fmt: skip
    assert main(args) == 0
    first = json.load(open(os.path.join(out, "results.json")))
    assert main(args) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "results.json")))[0]["test"] == first[0]["test"]
    saved = os.path.join(out, "linear", "seed0", "config.yaml")  # as a version without train.fsdp wrote it
    config = yaml.safe_load(open(saved))
    del config["train"]["fsdp"]
    with open(saved, "w") as f:
        yaml.safe_dump(config, f)
    assert main(args) == 0  # an option added since then is compared at its default
    assert "finished earlier" in capsys.readouterr().out
    assert main([*args, "train.lr=0.01"]) == 0  # another config: trained again
    assert "finished earlier" not in capsys.readouterr().out


def test_two_bench_calls_into_one_folder_give_one_table(tmp_path, capsys):
    out = str(tmp_path / "bench")
    common = ["bench", "--config", "toy", "--seeds", "0", "--output", out, *FAST]
    assert main([*common, "--methods", "linear"]) == 0
    assert main([*common, "--methods", "late_fusion"]) == 0
    rows = json.load(open(os.path.join(out, "results.json")))
    assert [r["method"] for r in rows] == ["linear", "late_fusion"]
    table = open(os.path.join(out, "results.md")).read()
    assert "| linear |" in table and "| late_fusion |" in table
    assert main([*common, "--methods", "linear", "train.lr=0.01"]) == 0  # rerun: its row is replaced
    assert [r["method"] for r in json.load(open(os.path.join(out, "results.json")))] == [
        "late_fusion",
        "linear",
    ]


def test_a_row_names_what_else_its_recipe_attached():
    from mmpeft.compare import method_label

    assert method_label({"method": "lora", "attached": ["lora"]}) == "lora"
    assert method_label({"method": "lora"}) == "lora"  # rows of results.json written before the field
    row = {"method": "uniadapter", "attached": ["temporal_transformer", "uniadapter"]}
    assert method_label(row) == "uniadapter (+ temporal_transformer)"
