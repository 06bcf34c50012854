"""``mmpeft list`` (registered plug-ins and shipped configs) and ``mmpeft inspect`` (parameter report)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import ConfigError
from ..registry import DATASETS, ENCODERS, METHODS, TASKS
from .helptext import describe_fields, first_sentence, summary
from .train import add_config_arguments

log = logging.getLogger("mmpeft")
REGISTRIES = {"methods": METHODS, "encoders": ENCODERS, "datasets": DATASETS, "tasks": TASKS}
CAPABILITIES = {
    "identity_at_init": "identity at init",
    "provides_fusion": "fusion",
    "trains_base_weights": "trains base weights",
    "needs_equal_width": "equal widths",
    "mergeable": "mergeable",
    "may_skip_params": "may skip params",
    "needs_video_tower": "needs a video tower",
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "list",
        help="list methods, encoders, datasets, tasks or shipped configs",
        description="List registered plug-ins; with NAME, show that plug-in's options and their help.",
    )
    p.add_argument("kind", choices=[*REGISTRIES, "configs"])
    p.add_argument("name", nargs="?", help="one plug-in to describe in full")
    p.set_defaults(handler=run_list)
    q = sub.add_parser(
        "inspect",
        help="trainable parameters per modality and method of a run config",
        description="Build the model of a run config and report its trainable parameters.",
    )
    add_config_arguments(q)
    q.set_defaults(handler=run_inspect)


def capabilities(method) -> str:
    caps = [text for attr, text in CAPABILITIES.items() if getattr(method, attr, False)]
    if method.min_modalities > 1:
        caps.insert(0, f">= {method.min_modalities} modalities")
    blocks = method.block_requirement()  # towers without transformer blocks (timm_cnn)
    if blocks:
        caps.append(blocks)
    return ", ".join(caps)


def run_list(args: argparse.Namespace) -> int:
    if args.kind == "configs":
        return list_configs(args.name)
    registry = REGISTRIES[args.kind]
    if args.name is None:
        items = registry.items()
        width = max((len(n) for n, _ in items), default=0)
        for name, cls in items:
            extra = f" [{capabilities(cls)}]" if args.kind == "methods" and capabilities(cls) else ""
            print(f"{name:<{width}}  {summary(cls)}{extra}")
        return 0
    try:
        cls = registry.get(args.name)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    print(f"{args.name}: {summary(cls)}")
    if args.kind == "methods" and capabilities(cls):
        print(f"capabilities: {capabilities(cls)}")
    if args.kind == "methods":
        print(f"missing modality: {cls.missing}")
    if args.kind == "tasks":
        print(f"primary metric: {cls.primary} ({'higher' if cls.higher_is_better else 'lower'} is better)")
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:
        print("options:")
        print(describe_fields(config_class))
    else:
        print((__import__("inspect").getmodule(cls).__doc__ or "").strip())
    return 0


def list_configs(name: str | None) -> int:
    from ..run_config import resolve_config_source, shipped_configs

    if name is not None:
        with open(resolve_config_source(name), encoding="utf-8") as f:
            print(f.read(), end="")
        return 0
    for config in shipped_configs():
        with open(resolve_config_source(config), encoding="utf-8") as f:
            lines = f.read().splitlines()
        comment = []
        for line in lines:
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        text = first_sentence("\n".join(comment))
        print(f"{config:<18}  {text.split(': ', 1)[-1] if text.startswith(config) else text}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from ..data.base import DataError
    from ..model import build_model
    from ..report import format_parameter_report
    from ..run_config import load_run_config, validate_run_config
    from ..train.setup import build_components

    config = load_run_config(args.config, args.overrides)
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        from ..methods.applicability import check_applicable

        task = config.get("task") if isinstance(config.get("task"), dict) else {}
        # from the config alone: nothing is built
        problems = check_applicable(config["model"], task.get("name"))
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 2
    try:
        model = build_components(config).model
    except (DataError, OSError) as e:  # the dataset is not here: report with the configured head
        log.warning("dataset not available (%s); the head uses model.head as configured", e)
        model = build_model(validate_run_config(config).config["model"])
    bb = model.backbone
    for m, enc in bb.encoders.items():
        print(f"encoder {m}: {type(enc).__name__}, width {enc.dim}, {enc.num_layers} blocks")
    print(format_parameter_report(model))
    s = bb.first_trainable_step()
    if s > 0:
        print(
            f"frozen prefix: schedule steps 0..{s - 1} of {bb.num_steps} run without gradients "
            "(train.prefix_cache=true caches them)"
        )
    else:
        print(f"frozen prefix: none (trainable modules act from step {s})")
    print(
        f"absent modalities: model.missing={model.missing.strategy} (mmpeft list methods NAME says how each treats them)"
    )
    return 0
