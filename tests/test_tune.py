"""``mmpeft tune`` on the toy config: the search space, trials on val only, resume, pruning, refit."""

import json
import os

import pytest

optuna = pytest.importorskip("optuna")

from mmpeft.cli.main import main  # noqa: E402
from mmpeft.config import ConfigError  # noqa: E402
from mmpeft.run_config import load_run_config, read_yaml  # noqa: E402
from mmpeft.tune import search_space, tune  # noqa: E402

FAST = [
    "train.tensorboard=false",
    "train.progress=false",
    "train.epochs=2",
    "train.batch_size=16",
    "data.sizes={train: 48, val: 32, test: 32}",
]
# a small space so that every trial is quick: epochs fixed, r small
SMALL = {"train.epochs": None, "model.methods.0.r": [2, 4]}


def toy(*overrides: str) -> dict:
    return load_run_config("toy", [*FAST, *overrides])


def study_of(out) -> "optuna.Study":
    return optuna.load_study(study_name=os.path.basename(out), storage=f"sqlite:///{out}/study.db")


def finished(study) -> list:
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials() if t.state in done]


def test_default_space_has_lr_and_the_methods_fields():
    space = search_space(toy())
    assert space["train.lr"] == {"type": "float", "low": 3e-4, "high": 3e-2, "log": True}
    assert 0.0 in space["train.weight_decay"]["choices"]
    assert (
        space["train.epochs"]["type"] == "int"
        and space["train.epochs"]["low"] <= 2 <= space["train.epochs"]["high"]
    )
    assert 4 in space["model.methods.0.r"]["choices"]  # lora r: 4 in toy.yaml
    assert {"model.methods.0.alpha", "model.methods.0.dropout"} <= set(space)
    assert not any(k.endswith((".k", ".rank", ".num_prompts")) for k in space)  # lora has none of these

    wander = search_space(toy("method=wander"))
    assert {"model.methods.0.k", "model.methods.0.r", "model.methods.0.rank"} <= set(wander)
    assert "model.methods.0.token_rank" not in wander  # None by default: not a number to search around
    assert {k for k in search_space(toy("method=linear"))} == {
        "train.lr",
        "train.weight_decay",
        "train.epochs",
    }
    assert "train.epochs" not in search_space(toy("train.max_steps=5"))


def test_a_yaml_space_overrides_and_extends_the_defaults(tmp_path):
    config = toy()
    config["tune"] = {
        "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "model.methods.0.r": {"type": "categorical", "choices": [4, 8, 16]},
        "train.batch_size": [16, 32],
        "train.epochs": None,
    }
    space = search_space(config)
    assert space["train.lr"] == {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}
    assert space["model.methods.0.r"] == {"type": "categorical", "choices": [4, 8, 16]}
    assert space["train.batch_size"] == {"type": "categorical", "choices": [16, 32]}
    assert "train.epochs" not in space and "train.weight_decay" in space
    # --space (the space argument) applies over the config's tune section
    space = search_space(
        config, {"model.methods.0.r": [2], "train.warmup_ratio": {"type": "float", "low": 0, "high": 0.2}}
    )
    assert space["model.methods.0.r"]["choices"] == [2]
    assert space["train.warmup_ratio"] == {"type": "float", "low": 0.0, "high": 0.2, "log": False}
    # the CLI prints it, reading a --space file
    path = tmp_path / "space.yaml"
    path.write_text("model.methods.0.r: {type: categorical, choices: [2, 8]}\ntrain.lr: null\n")
    assert main(["tune", "--config", "toy", *FAST, "--output", str(tmp_path / "o"), "--trials", "1",
                 "--space", str(path), "--print-space"]) == 0  # fmt: skip


def test_an_unknown_or_bad_space_entry_is_a_named_config_error():
    config = toy()
    with pytest.raises(ConfigError, match=r"'model\.methods\.0\.rr'.*did you mean 'model\.methods\.0\.r'"):
        search_space(config, {"model.methods.0.rr": [4, 8]})
    with pytest.raises(ConfigError, match=r"did you mean 'train\.lr'"):
        search_space({**config, "tune": {"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}})
    with pytest.raises(ConfigError, match=r"tune\.train\.lr\.type: 'uniform'"):
        search_space(config, {"train.lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}})
    with pytest.raises(ConfigError, match=r"unknown key 'hi' in tune\.train\.lr"):
        search_space(config, {"train.lr": {"type": "float", "low": 1e-4, "hi": 1e-2}})
    with pytest.raises(ConfigError, match=r"invalid run config.*model\.methods\[0\] \(lora\)\.r"):
        search_space(config, {"model.methods.0.r": {"type": "float", "low": 2, "high": 8}})  # r is an int


def test_trials_score_val_only_and_the_refit_scores_test(tmp_path):
    out = str(tmp_path / "tune")
    config = toy()
    config["tune"] = SMALL
    result = tune(config, out, trials=3, seed=1)
    study = study_of(out)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    best = json.load(open(os.path.join(out, "best.json")))
    assert best["value"] == max(t.value for t in trials) == result["best"]["value"]
    assert best["params"] == study.best_trial.params and best["metric"] == "accuracy"
    for t in trials:
        run = os.path.join(out, "trials", str(t.number))
        metrics = json.load(open(os.path.join(run, "metrics.json")))
        assert metrics["test"] == {}  # the test split was never scored
        assert not metrics.get("test_replaced")
        assert metrics["val"]["accuracy"] == t.value
        assert sorted(t.intermediate_values) == [1, 2]
        saved = read_yaml(os.path.join(run, "config.yaml"))
        assert saved["model"]["methods"][0]["r"] == t.params["model.methods.0.r"] in (2, 4)
        assert saved["train"]["lr"] == t.params["train.lr"] and saved["train"]["score_test"] is False
    best_config = read_yaml(os.path.join(out, "best_config.yaml"))
    assert "tune" not in best_config
    assert best_config["train"]["lr"] == best["params"]["train.lr"]
    assert best_config["model"]["methods"][0]["r"] == best["params"]["model.methods.0.r"]
    refit = json.load(open(os.path.join(out, "best", "metrics.json")))
    assert "accuracy" in refit["test"] and result["refit"]["test"] == refit["test"]


def test_a_rerun_resumes_the_study_and_retries_a_killed_trial(tmp_path):
    out = str(tmp_path / "tune")
    config = toy()
    tune(config, out, trials=2, space=SMALL, refit=False)
    first = [(t.number, t.params, t.value) for t in study_of(out).get_trials()]
    assert len(first) == 2
    # a trial left RUNNING, as by a killed process
    study = study_of(out)
    killed = study.ask(fixed_distributions=study.trials[0].distributions)
    tune(config, out, trials=3, space=SMALL, refit=False)
    trials = study_of(out).get_trials()
    assert [(t.number, t.params, t.value) for t in trials[:2]] == first
    assert len(finished(study_of(out))) == 3
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL
    retry = trials[-1]
    assert retry.user_attrs["retry_of"] == killed.number and retry.params == killed.params
    # the budget is reached: a third run trains nothing
    tune(config, out, trials=3, space=SMALL, refit=False)
    assert len(study_of(out).get_trials()) == len(trials)
    # the study belongs to its config
    with pytest.raises(ConfigError, match="another config"):
        tune(toy("train.seed=5"), out, trials=3, space=SMALL, refit=False)


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_pruned_trial_stops_training_early(tmp_path):
    out = str(tmp_path / "tune")
    result = tune(toy("train.epochs=3"), out, trials=2, space=SMALL, pruner=AlwaysPrune())
    trials = study_of(out).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(sorted(t.intermediate_values) == [1] for t in trials)  # one epoch of three
    assert not os.path.exists(os.path.join(out, "trials", "0", "metrics.json"))
    assert result["best"] is None and result["trials"]["pruned"] == 2
    assert not os.path.exists(os.path.join(out, "best.json"))


def test_the_cli(tmp_path, capsys):
    out = str(tmp_path / "tune")
    space = tmp_path / "space.yaml"
    space.write_text("tune:\n  train.epochs: null\n  model.methods.0.r: [2]\n")
    argv = ["tune", "--config", "toy", *FAST, "--output", out, "--trials", "1", "--space", str(space)]
    assert main([*argv, "--no-refit", "--pruner", "hyperband"]) == 0
    assert "best: trial 0" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "best.json")))["params"]["model.methods.0.r"] == 2
    assert not os.path.exists(os.path.join(out, "best"))
    space.write_text("model.methods.0.rr: [2]\n")
    assert main(argv) == 2
    assert "did you mean 'model.methods.0.r'" in capsys.readouterr().err
