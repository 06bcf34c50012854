"""Hyper-parameter search on the validation split with Optuna (``mmpeft tune``).

Every trial trains the run config once more, with the trial's values set at dotted paths (the
same paths the command-line overrides use: ``train.lr``, ``model.methods.0.r``), into
``<output>/trials/<number>``. Each epoch's validation score of the task's primary metric is
reported to Optuna, so median or Hyperband pruning stops hopeless trials early; the trial's value
is its best validation score. Trials never load the test split (``train.score_test=false``).

The search space starts from defaults derived from the run config (``default_space``): the
learning rate, weight decay and epochs, and each attached method's fields found in
``METHOD_FIELDS``. A ``tune:`` section of the run config, then ``space`` (``--space FILE``),
change or extend it; an entry set to null drops a default::

    tune:
      train.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
      model.methods.0.r: {type: categorical, choices: [4, 8, 16]}
      train.batch_size: [16, 32]        # a list: categorical choices
      train.epochs: null                # not searched

The study lives in ``<output>/study.db`` (SQLite): the same command run again after a kill
resumes it. ``trials`` counts finished (complete or pruned) trials over all runs of the study; a
trial left running by a killed process is marked failed and its values are tried once more. One
``mmpeft tune`` process at a time per study. At the end the best trial goes to ``best.json`` and
``best_config.yaml``, and (``refit``) the best config trains once more into ``<output>/best``
with the test split scored: the only place the test split is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from typing import Any

from .config import ConfigError
from .optional import require
from .registry import METHODS, closest
from .run_config import RUNTIME_ONLY, dump_yaml, plain, read_yaml, set_path, validate_run_config

log = logging.getLogger("mmpeft")

SPACE_TYPES = ("float", "int", "categorical")
SPEC_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
WEIGHT_DECAYS = [0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


def _pow2_around(value: int) -> dict:
    """Categorical: the value scaled by 1/4, 1/2, 1, 2, 4 (at least 1)."""
    choices = sorted({max(1, value // 4), max(1, value // 2), value, value * 2, value * 4})
    return {"type": "categorical", "choices": choices}


def _count_around(value: int) -> dict:
    """Integer, log-uniform from a quarter to four times the value."""
    return {"type": "int", "low": max(1, value // 4), "high": max(2, value * 4), "log": True}


def _dropout(_value: float) -> dict:
    return {"type": "float", "low": 0.0, "high": 0.3}


def _scale_around(value: float) -> dict:
    """Float, log-uniform from a quarter to four times the value."""
    return {"type": "float", "low": _round(value / 4), "high": _round(value * 4), "log": True}


def _round(x: float) -> float:
    return float(f"{x:.6g}")


# method-config field name -> its default range, built from the field's value in the run config.
# A field is searched only when the attached method's config has it and its value is a number.
METHOD_FIELDS = {
    "r": _pow2_around,  # bottleneck width / LoRA rank
    "rank": _pow2_around,  # CP / low-rank fusion rank
    "k": _pow2_around,  # Wander's fused tokens
    "proj_dim": _pow2_around,
    "out_dim": _pow2_around,
    "enhancer_dim": _pow2_around,
    "num_prompts": _count_around,
    "num_qp": _count_around,
    "num_qcp": _count_around,
    "num_fcp": _count_around,
    "dropout": _dropout,
    "enhancer_dropout": _dropout,
    "scale": _scale_around,
    "alpha": _scale_around,
}


# --- the search space ----------------------------------------------------------------------------
def split_tune_section(config: dict) -> tuple[dict, dict]:
    """(the run config without its ``tune`` section, that section or {})."""
    config = copy.deepcopy(config)
    section = config.pop("tune", None)
    if section is None:
        return config, {}
    if not isinstance(section, dict):
        raise ConfigError(f"tune: expected a mapping of dotted paths to search ranges, got {section!r}")
    return config, section


def default_space(resolved: dict) -> dict[str, dict]:
    """Default ranges for a resolved run config (``validate_run_config(...).config``)."""
    train = resolved["train"]
    space: dict[str, dict] = {
        "train.lr": {
            "type": "float",
            "low": _round(train["lr"] / 10),
            "high": _round(train["lr"] * 10),
            "log": True,
        },
        "train.weight_decay": {"type": "categorical", "choices": list(WEIGHT_DECAYS)},
    }
    if not train["max_steps"]:  # epochs count only without max_steps
        epochs = train["epochs"]
        low = max(1, epochs // 2)
        space["train.epochs"] = {
            "type": "int",
            "low": low,
            "high": max(low + 1, epochs + max(1, epochs // 2)),
        }
    for i, entry in enumerate(resolved["model"]["methods"]):
        config_class = METHODS.get(entry["name"]).config_class
        for f in dataclasses.fields(config_class):
            value = entry.get(f.name)
            if f.name not in METHOD_FIELDS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if value <= 0 and METHOD_FIELDS[f.name] is not _dropout:
                continue
            space[f"model.methods.{i}.{f.name}"] = METHOD_FIELDS[f.name](value)
    return space


def valid_paths(resolved: dict) -> list[str]:
    """Every dotted path of the resolved config that a search-space entry may set."""
    paths: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
            return
        paths.append(prefix)
        if isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}")

    walk(resolved, "")
    return paths


def check_spec(key: str, spec: Any) -> dict:
    """One search-space entry, normalised: ``{type, low, high, log, step}`` or ``{type, choices}``."""
    where = f"tune.{key}"
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with 'type' (or a list of choices), got {spec!r}")
    kind = spec.get("type")
    if kind not in SPACE_TYPES:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {list(SPACE_TYPES)}")
    for k in spec:
        if k not in SPEC_KEYS[kind]:
            raise ConfigError(f"unknown key {k!r} in {where} ({kind}); {closest(str(k), SPEC_KEYS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(f"{where}.choices: {c!r} is not a number, string, boolean or null")
        return {"type": kind, "choices": list(choices)}
    number = int if kind == "int" else (int, float)
    out: dict[str, Any] = {"type": kind}
    for k in ("low", "high"):
        v = spec.get(k)
        if isinstance(v, bool) or not isinstance(v, number):
            raise ConfigError(
                f"{where}.{k}: expected {'an integer' if kind == 'int' else 'a number'}, got {v!r}"
            )
        out[k] = v if kind == "int" else float(v)
    if out["low"] > out["high"]:
        raise ConfigError(f"{where}: low {out['low']} > high {out['high']}")
    out["log"] = spec.get("log", False)
    if not isinstance(out["log"], bool):
        raise ConfigError(f"{where}.log: expected true or false, got {out['log']!r}")
    if out["log"] and out["low"] <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0, got {out['low']}")
    if spec.get("step") is not None:
        step = spec["step"]
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise ConfigError(f"{where}.step: expected a positive {kind}, got {step!r}")
        if out["log"]:
            raise ConfigError(f"{where}: step and log: true cannot be combined")
        out["step"] = step if kind == "int" else float(step)
    return out


def search_space(config: dict, space: dict | None = None) -> dict[str, dict]:
    """The search space of a run config: defaults, then its ``tune`` section, then ``space``.

    Keys are dotted paths into the run config; an unknown path, a bad range, or a range whose ends
    make an invalid run config raises ``ConfigError``.
    """
    base, section = split_tune_section(config)
    resolved = validate_run_config(base).config
    result = {key: check_spec(key, spec) for key, spec in default_space(resolved).items()}
    paths = set(valid_paths(resolved))
    for source in (section, space or {}):
        if not isinstance(source, dict):
            raise ConfigError(f"tune: a search space is a mapping of dotted paths to ranges, got {source!r}")
        for key, spec in source.items():
            key = str(key)
            if key not in paths:
                raise ConfigError(f"tune: unknown search-space key {key!r}; {closest(key, paths)}")
            if spec is None:
                result.pop(key, None)
            else:
                result[key] = check_spec(key, spec)
    for end in ("low", "high"):  # every bound must give a valid run config
        values = {k: _end(spec, end) for k, spec in result.items()}
        try:
            validate_run_config(with_params(base, values))
        except ConfigError as e:
            raise ConfigError(
                f"tune: the search space's {end} ends give an invalid run config: {e}"
            ) from None
    return result


def _end(spec: dict, end: str) -> Any:
    if spec["type"] == "categorical":
        return spec["choices"][0 if end == "low" else -1]
    return spec[end]


def with_params(config: dict, params: dict[str, Any]) -> dict:
    """A copy of ``config`` with each dotted path of ``params`` set (as command-line overrides)."""
    config = copy.deepcopy(config)
    for key, value in params.items():
        set_path(config, key.split("."), value, f"{key}={value!r}")
    return config


def suggest(trial, key: str, spec: dict) -> Any:
    if spec["type"] == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    suggest_fn = trial.suggest_int if spec["type"] == "int" else trial.suggest_float
    if "step" in spec:
        return suggest_fn(key, spec["low"], spec["high"], step=spec["step"])
    return suggest_fn(key, spec["low"], spec["high"], log=spec["log"])


# --- the study -----------------------------------------------------------------------------------
def make_sampler(optuna, sampler, seed: int):
    if not isinstance(sampler, str):
        return sampler
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"tune: unknown sampler {sampler!r}; use tpe or random")


def make_pruner(optuna, pruner, max_epochs: int | None):
    if not isinstance(pruner, str):
        return pruner
    if pruner == "median":
        return optuna.pruners.MedianPruner()
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs or "auto")
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"tune: unknown pruner {pruner!r}; use median, hyperband or none")


def _comparable(config: dict) -> dict:
    """The config as stored with the study: plain JSON, runtime-only train options dropped."""
    config = json.loads(json.dumps(plain(config)))
    config["train"] = {k: v for k, v in (config.get("train") or {}).items() if k not in RUNTIME_ONLY}
    return config


def _recover_killed(optuna, study) -> None:
    """Trials left RUNNING by a killed process: mark them failed, try their values once more."""
    state = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        study.tell(t.number, state=state.FAIL)
        retry = "retry_of" not in t.user_attrs and bool(t.params)
        log.warning("tune: trial %d was left running (killed?); marked failed%s", t.number,
                    ", its values are tried again" if retry else "")  # fmt: skip
        if retry:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})


def _counts(optuna, study) -> dict[str, int]:
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    return {
        name: sum(t.state == s for t in trials)
        for name, s in (("complete", state.COMPLETE), ("pruned", state.PRUNED), ("failed", state.FAIL))
    }


def tune(
    config: dict,
    output_dir: str,
    *,
    trials: int,
    timeout_s: float | None = None,
    sampler: Any = "tpe",
    pruner: Any = "median",
    storage: str | None = None,
    study_name: str | None = None,
    space: dict | None = None,
    seed: int = 0,
    refit: bool = True,
    max_failures: int = 3,
) -> dict:
    """Search hyper-parameters of a run config on its validation split; returns a summary.

    ``trials``: finished (complete + pruned) trials the study should hold in the end, over every
    run of it; ``timeout_s``: no new trial starts after this many seconds of this call.
    ``sampler``: "tpe", "random" or an Optuna sampler; ``pruner``: "median", "hyperband", "none"
    or an Optuna pruner. ``storage``: an Optuna storage URL (default: SQLite ``<output>/study.db``).
    ``refit``: train the best config into ``<output>/best`` and score its test split.
    ``max_failures``: stop after this many failed trials in a row (e.g. non-finite losses).
    Returns ``{"best": {...} or None, "trials": counts, "refit": metrics or None}``.
    """
    optuna = require("optuna", "tune")
    from .train import Trainer
    from .train.trainer import TrainingError

    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"tune: trials must be a positive integer, got {trials!r}")
    base, _ = split_tune_section(config)
    the_space = search_space(config, space)
    validated = validate_run_config(base)
    task_class = validated.task_class
    primary, maximize = task_class.primary, task_class.higher_is_better
    max_epochs = None
    if not validated.train.max_steps:
        epochs = the_space.get("train.epochs")
        max_epochs = validated.train.epochs
        if epochs is not None:
            max_epochs = max(int(_end(epochs, "high")), int(_end(epochs, "low")))

    os.makedirs(output_dir, exist_ok=True)
    if storage is None:
        storage = "sqlite:///" + os.path.abspath(os.path.join(output_dir, "study.db"))
    study_name = study_name or os.path.basename(os.path.abspath(output_dir)) or "mmpeft-tune"
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize" if maximize else "minimize",
        pruner=make_pruner(optuna, pruner, max_epochs),
        load_if_exists=True,
    )
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", _comparable(base))
        study.set_user_attr("primary", primary)
    elif stored != _comparable(base):
        raise ConfigError(
            f"tune: study {study_name!r} in {storage} was run with another config; "
            "rerun with the same config and overrides, or use a new --output"
        )
    if study.user_attrs.get("space") not in (None, the_space):
        log.warning("tune: the search space differs from the one the study started with")
    study.set_user_attr("space", the_space)
    _recover_killed(optuna, study)
    # a resumed study gets a sampler seeded apart from the first run's, so it does not redo its draws
    study.sampler = make_sampler(optuna, sampler, seed + len(study.get_trials(deepcopy=False)))

    def objective(trial) -> float:
        params = {key: suggest(trial, key, spec) for key, spec in the_space.items()}
        run_config = with_params(base, params)
        run_config["train"] = {**run_config.get("train", {}), "score_test": False, "checkpoint": False}
        run_dir = os.path.join(output_dir, "trials", str(trial.number))
        trial.set_user_attr("run_dir", run_dir)

        def report(_trainer, event: str, state) -> None:
            if event != "eval":
                return
            record = state.history[-1]
            value = record["val"].get(primary)
            if value is None:
                raise ConfigError(
                    f"tune: no validation {primary!r} after epoch {record['epoch']}; "
                    "the dataset needs a 'val' split"
                )
            trial.report(float(value), record["epoch"] + 1)  # step = epochs done
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} ({primary} {value:.4f})")

        try:
            metrics = Trainer(run_config, run_dir, callbacks=[report]).fit()
        finally:
            _free_memory()
        trial.set_user_attr("best_epoch", metrics["best_epoch"])
        return float(metrics["val"][primary])

    failures = 0
    last: list = []
    started = time.monotonic()
    while True:
        counts = _counts(optuna, study)
        if counts["complete"] + counts["pruned"] >= trials:
            break
        if timeout_s is not None and time.monotonic() - started >= timeout_s:
            log.warning("tune: --timeout reached after %.0f s; run the command again to go on", timeout_s)
            break
        study.optimize(
            objective, n_trials=1, catch=(TrainingError,), callbacks=[lambda _s, t: last.append(t)],
            gc_after_trial=True,
        )  # fmt: skip
        failures = failures + 1 if last and last[-1].state == optuna.trial.TrialState.FAIL else 0
        if failures >= max_failures:
            raise TrainingError(
                f"tune: {failures} trials in a row failed (the last: trial {last[-1].number}, "
                f"{last[-1].user_attrs.get('run_dir')}); narrow the search space, e.g. train.lr"
            )

    counts = _counts(optuna, study)
    summary: dict[str, Any] = {"best": None, "trials": counts, "refit": None}
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    print(
        f"tune: {counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed trials "
        f"in {storage} (study {study_name!r})"
    )
    if not completed:
        print("tune: no trial completed; no best config")
        return summary
    best_trial = study.best_trial
    best = {
        "trial": best_trial.number,
        "value": best_trial.value,
        "metric": primary,
        "direction": "maximize" if maximize else "minimize",
        "params": dict(best_trial.params),
        "run_dir": best_trial.user_attrs.get("run_dir"),
        "best_epoch": best_trial.user_attrs.get("best_epoch"),
        "trials": counts,
        "study": study_name,
        "storage": storage,
    }
    summary["best"] = best
    best_config = with_params(base, best_trial.params)
    with open(os.path.join(output_dir, "best.json"), "w", encoding="utf-8") as f:
        json.dump(best, f, indent=2)
    with open(os.path.join(output_dir, "best_config.yaml"), "w", encoding="utf-8") as f:
        f.write(dump_yaml(best_config))
    print(f"best: trial {best_trial.number}, val {primary} {best_trial.value:.4f}")
    for key, value in best_trial.params.items():
        print(f"  {key} = {value!r}")
    print(f"saved {os.path.join(output_dir, 'best.json')} and {os.path.join(output_dir, 'best_config.yaml')}")
    if refit:
        refit_dir = os.path.join(output_dir, "best")
        if os.path.isdir(refit_dir):
            shutil.rmtree(refit_dir)
        print(f"refit: training the best config into {refit_dir} ...")
        metrics = Trainer(best_config, refit_dir).fit()
        summary["refit"] = {k: metrics[k] for k in ("val", "test", "best_epoch", "train_time_s")}
        test = ", ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items()) or "- (no test split)"
        print(f"refit: val {primary} {metrics['val'].get(primary, math.nan):.4f}; test: {test}")
    return summary


def _free_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_space(path: str) -> dict:
    """A ``--space`` YAML file: the mapping itself, or a file with a top-level ``tune`` section."""
    data = read_yaml(path)
    if set(data) == {"tune"}:
        data = data["tune"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of dotted paths to search ranges")
    return data
