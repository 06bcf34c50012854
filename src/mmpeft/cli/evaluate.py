"""``mmpeft eval``: rebuild a trained run from DIR/config.yaml + DIR/adapter and score a split."""

from __future__ import annotations

import argparse
import json


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--run DIR and --split NAME, shared with ``mmpeft robustness``."""
    p.add_argument("--run", required=True, metavar="DIR", help="the --output folder of `mmpeft train`")
    p.add_argument("--split", default="test", help="split to score (default: test)")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a trained run on a split (reproduces its test metrics)",
        description="Rebuild the model of a `mmpeft train` run and evaluate it.",
    )
    add_run_arguments(p)
    p.add_argument(
        "--noise",
        action="append",
        metavar="MODALITY=LEVEL",
        help="add Gaussian noise to that modality's raw input, std = LEVEL x the input's own std "
        "(repeat or comma-join for several, e.g. --noise image=0.5)",
    )
    p.add_argument(
        "--missing",
        action="append",
        metavar="MODALITY=RATE",
        help="remove that modality from this fraction of the examples, drawn per example with --seed "
        "(e.g. --missing audio=1.0: every example without its audio)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the missing draws (default: 0)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data.perturb import parse_levels
    from ..train import evaluate_run

    noise = parse_levels(args.noise, "--noise")
    missing = parse_levels(args.missing, "--missing")
    metrics = evaluate_run(args.run, args.split, noise=noise, seed=args.seed, missing=missing)
    out = {args.split: metrics}
    if noise:
        out["noise"] = {"levels": noise, "seed": args.seed}
    if missing:
        out["missing"] = {"rates": missing, "seed": args.seed}
    print(json.dumps(out, indent=2))
    return 0
