"""``mmpeft train``: train a run config; writes metrics.json, config.yaml, adapter/ under --output."""

from __future__ import annotations

import argparse
import json
import os

from ..config import ConfigError
from ..run_config import TrainConfig, load_run_config
from ..run_folder import prepare_output
from .helptext import describe_fields

OVERRIDES_HELP = (
    "dotted overrides key.sub=value (values parsed as YAML), e.g. train.lr=3e-4 "
    "model.methods.0.r=16; method=NAME replaces model.methods with that one method"
)


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--config",
        required=required,
        metavar="FILE|NAME",
        help="a run-config YAML file, or the name of a shipped config (`mmpeft list configs`)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)


def add_parser(sub) -> None:
    epilog = (
        "training options (train.KEY=VALUE):\n"
        + describe_fields(TrainConfig, prefix="train.")
        + "\n\nmethod options: `mmpeft list methods NAME`; dataset and task options: "
        "`mmpeft list datasets NAME`, `mmpeft list tasks NAME`."
    )
    p = sub.add_parser(
        "train",
        help="train a run config",
        description="Train a run config: {model, task, data, train}.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, required=False)
    p.add_argument("--output", required=True, metavar="DIR", help="run folder for metrics, config, adapter")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its newest checkpoint (--config may then be omitted)",
    )
    add_overwrite_argument(p)
    p.set_defaults(handler=run)


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run that --output already holds (without it, such an --output is refused)",
    )


def config_source(args: argparse.Namespace, saved: str, command: str, shown: str) -> str:
    """``--config``, or with ``--resume`` and no ``--config`` the run's saved config ``saved``."""
    if args.config is not None:
        return args.config
    if not (args.resume and os.path.isfile(saved)):
        raise ConfigError(f"{command}: --config is required (unless --resume finds {shown})")
    return saved


def run(args: argparse.Namespace) -> int:
    from ..distributed import is_main_process
    from ..train import Trainer

    source = config_source(args, os.path.join(args.output, "config.yaml"), "train", "DIR/config.yaml")
    config = load_run_config(source, args.overrides)
    prepare_output(args.output, resume=args.resume, overwrite=args.overwrite, command="train")
    metrics = Trainer(config, args.output, resume=args.resume).fit()
    summary = {k: metrics[k] for k in ("trainable_params", "peak_memory_mb", "train_time_s", "val", "test")}
    if is_main_process():  # every process has the metrics; one prints them
        print(json.dumps(summary, indent=2))
    return 0
