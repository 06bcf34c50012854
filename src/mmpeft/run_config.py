"""Run configs: ``{model, task, data, train}`` from YAML or a dict, checked before anything is built.

A run config names the model (encoders, methods, head; see ``mmpeft.model``), the task, the
dataset reader and the training options (``TrainConfig``). ``load_run_config`` reads a YAML file
or a shipped config by name (``src/mmpeft/configs/<name>.yaml``) and applies dotted overrides
(``train.lr=3e-4``; ``method=lora`` replaces ``model.methods`` with ``[{name: lora}]``).
``validate_run_config`` checks every section against the registries and the config dataclasses;
an unknown key or name raises ``ConfigError`` with the closest valid names.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import yaml

from .config import ConfigError, from_dict
from .missing import dropout_rates, resolve_strategy
from .model import validate_model_spec
from .registry import DATASETS, TASKS, closest


@dataclass
class TrainConfig:
    seed: int = 0
    """Seed of every random number generator (model init, dropout, data order)."""
    epochs: int = 10
    """Passes over the training split (ignored when ``max_steps`` is set)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: train for ``epochs``)."""
    batch_size: int = 32
    """Examples per batch on each process."""
    eval_batch_size: int = 0
    """Examples per batch during evaluation (0: ``batch_size``)."""
    gradient_accumulation_steps: int = 1
    """Batches whose gradients are summed before each optimizer step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW weight decay of matrices (biases, norms and 1-D parameters get none)."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps spent warming the learning rate up linearly."""
    warmup_steps: int = 0
    """Warm-up length in steps; overrides ``warmup_ratio`` when > 0."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision: fp16 or bf16 on GPU, bf16 on CPU too (fp16 is ignored on the CPU)."""
    modality_dropout: dict | float | None = None
    """Drop modalities of training examples at random, {modality: rate} or one rate for all (e.g.
    {audio: 0.3}); an example keeps at least one. Makes ``model.missing: auto`` a learned placeholder."""
    gradient_checkpointing: bool = False
    """Recompute each trainable block step in backward instead of storing its activations (less
    memory for methods in many layers, about one more forward of the trainable region in time)."""
    compile: bool = False
    """torch.compile the training forward (and so its backward); evaluation stays eager."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor (generated kernels; the CPU needs a C++ compiler) or e.g.
    aot_eager (traced, no code generation)."""
    cpu: bool = False
    """Train on the CPU even when a GPU is available."""
    fsdp: bool = False
    """Shard every all-frozen encoder block over the processes with FSDP2 (``fully_shard``); the
    trainable modules stay whole and their gradients are averaged (train/sharding.py). Also on
    when ``accelerate launch`` is given an FSDP config. Needs torchrun or accelerate launch."""
    patience: int = 0
    """Stop after this many evaluations without improvement on the validation split (0: never)."""
    head_init: Literal["default", "probe"] = "default"
    """``probe``: before training, fit the head in closed form on the model's features at
    initialisation (the ``probe`` method's fit, its alpha chosen on val), then train from there."""
    head_init_alphas: list[float] | None = None
    """Regularisation strengths tried by ``head_init: probe`` (None: the probe's default grid)."""
    refit: bool = False
    """After choosing the epoch count (the probe: its alpha) on val, train afresh on train+val with
    that choice and score test with the refitted model (the reference probes' protocol)."""
    score_test: bool = True
    """Score the test split with the best adapter at the end (False: never load it; ``mmpeft tune`` trials)."""
    modality_contribution: bool = True
    """Also score test with each modality's input replaced by another example's (two or more
    modalities; not for retrieval): ``test_replaced`` in metrics.json shows what each modality adds."""
    prefix_cache: bool = False
    """Compute the frozen prefix's states once per distinct input; train and evaluate from them."""
    cache_dir: str | None = None
    """Folder of the on-disk prefix cache shared by runs (None: $MMPEFT_CACHE_DIR, else
    ~/.cache/mmpeft/prefix; "": keep it in memory for this run only)."""
    checkpoint: bool = True
    """Write resumable checkpoints (after every epoch and every ``checkpoint_every_steps``)."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every this many optimizer steps (0: only at epoch ends)."""
    keep_checkpoints: int = 1
    """Newest checkpoints to keep on disk."""
    num_workers: int = 0
    """DataLoader worker processes that read and collate examples."""
    log_every_steps: int = 10
    """TensorBoard logging interval of the training loss, in optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard logs under ``<output>/tensorboard``."""
    progress: bool = True
    """Show progress bars (only on a terminal)."""
    stop_after_steps: int = 0
    """Testing aid: end the process abruptly, as if killed, after this many optimizer steps (0: off)."""


# options that may differ between a killed run and its resumption
RUNTIME_ONLY = {
    "score_test",
    "stop_after_steps",
    "progress",
    "num_workers",
    "tensorboard",
    "log_every_steps",
    "cache_dir",
    "compile",
    "compile_backend",
}


@dataclass
class RunConfig:
    model: dict
    """Encoders, methods and head (see ``mmpeft inspect``)."""
    task: dict
    """Task name and options (``mmpeft list tasks``)."""
    data: dict
    """Dataset reader name and options (``mmpeft list datasets``)."""
    train: dict = field(default_factory=dict)
    """Training options (``TrainConfig``)."""


@dataclass
class ValidatedRun:
    """A run config that passed every check; nothing is built yet."""

    config: dict
    """The config with every default filled in (written as ``config.yaml``)."""
    train: TrainConfig
    task_class: type
    task_config: Any
    reader_class: type
    reader_config: Any
    head_outputs_given: bool


def _named_section(section: dict, registry, where: str) -> tuple[type, Any, dict]:
    if not isinstance(section, dict) or "name" not in section:
        raise ConfigError(f"{where}: needs a 'name' ({registry.kind}s: {', '.join(registry.names())})")
    options = dict(section)
    name = options.pop("name")
    try:
        cls = registry.get(name)
    except KeyError as e:
        raise ConfigError(f"{where}.name: {e.args[0]}") from None
    cfg = from_dict(cls.config_class, options, where=f"{where} ({name})")
    return cls, cfg, {"name": name, **plain(dataclasses.asdict(cfg))}


def plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so a config dumps as plain YAML."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def validate_run_config(config: dict, reader_class: type | None = None) -> ValidatedRun:
    """Check every section of a run config; return it with defaults filled in.

    ``reader_class``: a reader supplied by the caller instead of the registered ``data.name``
    (the data section then holds that reader's options).
    """
    if not isinstance(config, dict):
        raise ConfigError(
            f"a run config must be a mapping with model/task/data/train, got {type(config).__name__}"
        )
    run = from_dict(RunConfig, config, where="config")
    spec, encoders, methods, head = validate_model_spec(run.model)
    train = from_dict(TrainConfig, run.train, where="train")
    check_train_config(train)
    dropout_rates(train.modality_dropout, list(encoders))
    model = {
        "encoders": {m: plain(dataclasses.asdict(s)) for m, s in encoders.items()},
        "methods": [
            {
                "name": method.name,
                **({} if key == method.name else {"key": key}),
                **plain(dataclasses.asdict(cfg)),
            }
            for key, method, cfg in methods
        ],
        "head": plain(dataclasses.asdict(head)),
        "missing": resolve_strategy(spec.missing, train.modality_dropout),
    }
    task_cls, task_cfg, task = _named_section(run.task, TASKS, "task")
    if reader_class is None:
        reader_cls, reader_cfg, data = _named_section(run.data, DATASETS, "data")
    else:
        options = {k: v for k, v in run.data.items() if k != "name"}
        reader_cls = reader_class
        reader_cfg = from_dict(reader_class.config_class, options, where=f"data ({reader_class.name})")
        data = {"name": reader_class.name, **plain(dataclasses.asdict(reader_cfg))}
    resolved = {"model": model, "task": task, "data": data, "train": dataclasses.asdict(train)}
    given = isinstance(run.model.get("head"), dict) and "num_outputs" in run.model["head"]
    return ValidatedRun(resolved, train, task_cls, task_cfg, reader_cls, reader_cfg, given)


def check_train_config(t: TrainConfig) -> None:
    positive = ["batch_size", "gradient_accumulation_steps", "keep_checkpoints", "log_every_steps"]
    for name in positive:
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    for name in ["epochs", "max_steps", "eval_batch_size", "warmup_steps", "patience", "num_workers"]:
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if t.epochs == 0 and t.max_steps == 0:
        raise ConfigError("train: set epochs or max_steps to a positive number")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")


# --- loading -------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string; here it is a float, as users mean it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only


def shipped_configs() -> list[str]:
    """Names of the YAML configs shipped in ``mmpeft/configs``."""
    folder = config_folder()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_folder():
    """The package-data folder ``mmpeft/configs`` (a Traversable)."""
    return resources.files("mmpeft").joinpath("configs")


def read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = parse_yaml(f.read())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with model/task/data/train at the top")
    return data


def resolve_config_source(source: str) -> str:
    """A file path, or the name of a shipped config (``toy``, ``toy.yaml``) -> a readable path."""
    if os.path.isfile(source):
        return source
    name = os.path.basename(source)
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if os.sep not in source and name in shipped_configs():
        return str(config_folder().joinpath(f"{name}.yaml"))
    raise ConfigError(
        f"config {source!r} is neither a file nor a shipped config; {closest(name, shipped_configs())}"
    )


def load_run_config(source: str | dict, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a config (path, shipped name or dict) and apply dotted overrides; not yet validated."""
    if isinstance(source, dict):
        config = copy.deepcopy(source)
    else:
        path = resolve_config_source(source)
        config = resolve_relative_paths(read_yaml(path), path)
    return apply_overrides_and_recipe(config, overrides)


def path_bases(config_path: str) -> list[str]:
    """Where a config file's relative paths may start: its own folder, then the checkout holding it
    (the nearest folder above with a pyproject.toml; shipped configs say "relative to the repository
    root", e.g. ``../shared/data/...`` beside the team's checkout)."""
    folder = os.path.dirname(os.path.abspath(config_path))
    bases = [folder]
    up = folder
    while os.path.dirname(up) != up:
        up = os.path.dirname(up)
        if os.path.isfile(os.path.join(up, "pyproject.toml")):
            bases.append(up)
            break
    return bases


def resolve_relative_paths(config: dict, config_path: str) -> dict:
    """A relative data or weights path of a config file that does not exist from the current
    directory, but does from the config's folder or its checkout, becomes that absolute path; so a
    config runs from any directory. Other values (hub names, missing paths) are left as written."""
    bases = path_bases(config_path)

    def resolve(value: Any) -> Any:
        if not isinstance(value, str) or not value or os.path.isabs(value) or ":" in value:
            return value
        if os.path.exists(os.path.expanduser(value)):
            return value
        for base in bases:
            candidate = os.path.normpath(os.path.join(base, value))
            if os.path.exists(candidate):
                return candidate
        return value

    data = config.get("data")
    if isinstance(data, dict):
        for key in ("root", "base_dir"):
            if key in data:
                data[key] = resolve(data[key])
    encoders = (config.get("model") or {}).get("encoders")
    if isinstance(encoders, dict):
        for spec in encoders.values():
            if isinstance(spec, dict) and "path" in spec:
                spec["path"] = resolve(spec["path"])
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    path = key.strip().split(".")
    if any(not p for p in path):
        raise ConfigError(f"override {text!r}: empty part in key {key!r}")
    return path, value


def apply_overrides(config: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.sub=value`` overrides in order; ``method=NAME`` sets ``model.methods`` to one method."""
    for text in overrides:
        path, value = parse_override(text)
        if path == ["method"]:
            if not isinstance(value, str):
                raise ConfigError(f"override {text!r}: method=NAME needs a method name")
            config.setdefault("model", {})["methods"] = [{"name": value}]
            continue
        set_path(config, path, value, text)
    return config


def set_path(config: dict, path: list[str], value: Any, text: str) -> None:
    node: Any = config
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            node = node[_index(part, node, where, text)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"override {text!r}: {where!r} is a {type(node).__name__}, not a mapping")
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {text!r}: {where!r} holds {node!r}, not a mapping or list")
    last = path[-1]
    if isinstance(node, list):
        node[_index(last, node, text, text)] = value
    else:
        node[last] = value


def _index(part: str, node: list, where: str, text: str) -> int:
    try:
        i = int(part)
        node[i]
    except (ValueError, IndexError):
        raise ConfigError(f"override {text!r}: {where!r} is a list of {len(node)}; use an index") from None
    return i


def dump_yaml(config: dict) -> str:
    return yaml.safe_dump(plain(config), sort_keys=False)


# --- recipes: per-method overrides carried by a run config ---------------------------------------
def apply_recipe(config: dict, method: str | None = None) -> bool:
    """Pop ``recipes`` (method name -> dotted overrides) from ``config``; apply the chosen method's.

    The recipe applies when ``model.methods`` is exactly one method, named ``method`` (any name
    when ``method`` is None). Returns whether a recipe was applied; ``recipes`` is gone either way.
    """
    recipes = config.pop("recipes", None)
    if recipes is None:
        return False
    check_recipes(recipes)
    methods = (config.get("model") or {}).get("methods")
    if not (isinstance(methods, list) and len(methods) == 1 and isinstance(methods[0], dict)):
        return False
    name = methods[0].get("name")
    if not isinstance(name, str) or name not in recipes or (method is not None and name != method):
        return False
    apply_overrides(config, recipes[name] or [])
    return True


def check_recipes(recipes: Any, where: str = "recipes") -> None:
    """``recipes`` must map registered method names to lists of dotted overrides."""
    from .registry import METHODS

    if not isinstance(recipes, dict):
        raise ConfigError(f"{where}: expected a mapping method -> list of overrides, got {recipes!r}")
    for name, overrides in recipes.items():
        if name not in METHODS:
            raise ConfigError(f"{where}: unknown method {name!r}; {closest(str(name), METHODS.names())}")
        if overrides is None:
            continue
        if not isinstance(overrides, list) or not all(isinstance(t, str) for t in overrides):
            raise ConfigError(f"{where}.{name}: expected a list of key.sub=value overrides: {overrides!r}")
        for text in overrides:
            if parse_override(text)[0][0] in ("method", "recipes"):
                raise ConfigError(f"{where}.{name}: {text!r} may not change the method or the recipes")


def apply_overrides_and_recipe(config: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Overrides, then the chosen method's recipe, then the overrides again: the command line wins.

    The replay puts each ``method=NAME`` back as the recipe left ``model.methods``, so an override
    that ``method=NAME`` replaced stays replaced and the ones after it apply on top of the recipe.
    """
    apply_overrides(config, overrides)
    if not apply_recipe(config):
        return config
    methods = copy.deepcopy(config["model"]["methods"])
    for text in overrides:
        path = parse_override(text)[0]
        if path == ["method"]:
            config.setdefault("model", {})["methods"] = copy.deepcopy(methods)
        elif path[0] != "recipes":
            apply_overrides(config, [text])
    return config


def check_same_config(saved: dict, current: dict, path: str) -> None:
    """A resumed run must use the config it started with (runtime-only train options may change).
    Both are validated first, so an option added since the run was written counts at its default."""

    def comparable(cfg: dict) -> dict:
        train = {k: v for k, v in cfg.get("train", {}).items() if k not in RUNTIME_ONLY}
        return {**cfg, "train": train}

    a, b = (comparable(validate_run_config(copy.deepcopy(c)).config) for c in (saved, current))
    if a != b:
        diffs = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise ConfigError(f"--resume: the config differs from the run's {path} in sections {diffs}")
