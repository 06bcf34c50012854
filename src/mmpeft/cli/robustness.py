"""``mmpeft robustness``: score a trained run with each modality missing at several rates."""

from __future__ import annotations

import argparse
import os

from .evaluate import add_run_arguments


def add_parser(sub) -> None:
    p = sub.add_parser(
        "robustness",
        help="score a trained run with each modality missing at rates 0..1 (table + plot)",
        description="Sweep missing rates per modality over a split of a `mmpeft train` run; writes "
        "robustness.json, robustness.md and robustness.png.",
    )
    add_run_arguments(p)
    p.add_argument(
        "--rates",
        default="0,0.3,0.5,0.7,1.0",
        help="comma-separated missing rates (default: 0,0.3,0.5,0.7,1.0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the missing draws (default: 0)")
    p.add_argument("--output", metavar="DIR", help="where to write the results (default: RUN/robustness)")
    p.set_defaults(handler=run)


def parse_rates(text: str) -> list[float]:
    from ..data.base import DataError

    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        rates = []
    if not rates or any(not 0.0 <= r <= 1.0 for r in rates):
        raise DataError(f"--rates {text!r}: expected comma-separated fractions in [0, 1], e.g. 0,0.5,1")
    return rates


def run(args: argparse.Namespace) -> int:
    from .. import robustness
    from ..train.evaluation import RunEvaluator

    rates = parse_rates(args.rates)
    result = robustness.sweep(RunEvaluator(args.run), rates, args.split, args.seed)
    print(robustness.table(result), end="")
    for path in robustness.write(result, args.output or os.path.join(args.run, "robustness")):
        print(f"wrote {path}")
    return 0
