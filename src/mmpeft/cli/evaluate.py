"""``mmpeft eval``: rebuild a trained run from DIR/config.yaml + DIR/adapter and score a split."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a trained run on a split (reproduces its test metrics)",
        description="Rebuild the model of a `mmpeft train` run and evaluate it.",
    )
    p.add_argument("--run", required=True, metavar="DIR", help="the --output folder of `mmpeft train`")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..train import evaluate_run

    metrics = evaluate_run(args.run, args.split)
    print(json.dumps({args.split: metrics}, indent=2))
    return 0
