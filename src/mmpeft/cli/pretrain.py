"""``mmpeft pretrain``: train encoders fully on a source task; save each one for ``path:`` in later runs."""

from __future__ import annotations

import argparse
import json
import os

from ..run_config import TrainConfig
from .helptext import describe_fields
from .train import add_config_arguments, config_source


def add_parser(sub) -> None:
    epilog = (
        "Writes DIR/<modality>/ (the encoder in its family's own format), DIR/pretrain.json and the\n"
        "training run DIR/run/. A later run config loads an encoder frozen with\n"
        "  model.encoders.<modality>: {type: <family>, path: DIR/<modality>}\n"
        "(pretrain.json lists these specs). model.methods is set to [full].\n\n"
        "training options (train.KEY=VALUE):\n" + describe_fields(TrainConfig, prefix="train.")
    )
    p = sub.add_parser(
        "pretrain",
        help="pre-train encoders on a source task and save them",
        description="Train a run config's encoders fully (method full) on its task, then save each\n"
        "encoder, with the best-on-validation weights, with its family's save_pretrained.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, required=False)
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the saved encoders and the run")
    p.add_argument(
        "--save",
        metavar="MODALITIES",
        default=None,
        help="comma-separated modalities whose encoders to save, e.g. audio,video (default: all)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in DIR/run from its newest checkpoint (--config may then be omitted)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..pretrain import RUN_FOLDER, pretrain

    saved = os.path.join(args.output, RUN_FOLDER, "config.yaml")
    source = config_source(args, saved, "pretrain", "DIR/run/config.yaml")
    info = pretrain(source, args.output, args.save, overrides=args.overrides, resume=args.resume)
    summary = {k: info[k] for k in ("encoders", "best_epoch", "train_time_s", "val", "test")}
    print(json.dumps(summary, indent=2))
    return 0
