"""``mmpeft pretrain``: train encoders fully on a source task; save each one for ``path:`` in later runs."""

from __future__ import annotations

import argparse
import json
import os

from ..run_config import TrainConfig
from ..run_folder import prepare_output
from .helptext import describe_fields
from .train import add_config_arguments, add_overwrite_argument, config_source


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
    add_overwrite_argument(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..pretrain import INFO_NAME, RUN_FOLDER, pretrain

    saved = os.path.join(args.output, RUN_FOLDER, "config.yaml")
    source = config_source(args, saved, "pretrain", "DIR/run/config.yaml")
    run_dir = os.path.join(args.output, RUN_FOLDER)
    prepare_output(run_dir, resume=args.resume, overwrite=args.overwrite, command="pretrain")
    # a finished pre-training (its saved encoders are replaced atomically at the end)
    prepare_output(
        args.output, resume=args.resume, overwrite=args.overwrite, command="pretrain", entries=(INFO_NAME,)
    )
    info = pretrain(source, args.output, args.save, overrides=args.overrides, resume=args.resume)
    summary = {k: info[k] for k in ("encoders", "best_epoch", "train_time_s", "val", "test")}
    print(json.dumps(summary, indent=2))
    return 0
