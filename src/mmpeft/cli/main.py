"""The ``mmpeft`` command: train | pretrain | tune | eval | robustness | bench | list | inspect | demo.

mmpeft train --config toy method=wander train.epochs=3 --output runs/toy-wander
mmpeft eval --run runs/toy-wander --missing image=1.0
mmpeft robustness --run runs/toy-wander
mmpeft list methods            mmpeft list methods wander
mmpeft inspect --config toy method=pmf
mmpeft bench --config toy --methods linear,lora,wander,pmf --seeds 0,1,2 --output runs/toy-bench
mmpeft tune --config toy method=lora --trials 20 --output runs/toy-tune
mmpeft pretrain --config pretrain-cmu-pom --output weights/pom-features
mmpeft demo
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..config import ConfigError
from ..distributed import is_main_process
from . import bench, demo, evaluate, listing, pretrain, robustness, train, tune


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmpeft",
        description="Parameter-efficient fine-tuning of multimodal models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages; show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, pretrain, tune, evaluate, robustness, bench, listing, demo):
        module.add_parser(sub)
    return parser


def known_errors() -> tuple[type[BaseException], ...]:
    """User-facing errors that get a one-line message instead of a traceback."""
    from ..adapter_io import AdapterError
    from ..data.base import DataError
    from ..train.cache import CacheError
    from ..train.checkpointing import CheckpointError
    from ..train.trainer import StopTraining, TrainingError

    # OSError: missing files or weights that cannot be downloaded; ImportError: a missing extra
    return (
        ConfigError, DataError, CacheError, TrainingError, StopTraining, AdapterError, CheckpointError,
        OSError, ImportError,
    )  # fmt: skip


def resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted command left: checkpoints are written atomically, so the newest is whole."""
    from ..train.checkpointing import checkpoint_folders

    output = getattr(args, "output", None)
    if args.command not in ("train", "pretrain") or not output:
        return "nothing was saved half-written"
    run_dir = output if args.command == "train" else os.path.join(output, "run")
    if checkpoint_folders(os.path.join(run_dir, "checkpoints")):
        return f"continue from the last checkpoint with: mmpeft {args.command} --output {output} --resume"
    return "no checkpoint was written yet (train.checkpoint_every_steps saves within an epoch); start again"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come in several runs between options: `--config toy a=1 --output d b=2`
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if not is_main_process():  # torchrun / accelerate: one log, from the main process
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print(f"mmpeft {args.command}: interrupted; {resume_hint(args)}", file=sys.stderr)
        return 130
    except known_errors() as e:
        from ..train.trainer import StopTraining

        if args.verbose:
            raise

        print(f"mmpeft {args.command}: {e}", file=sys.stderr)
        return 3 if isinstance(e, StopTraining) else 2


if __name__ == "__main__":
    sys.exit(main())
