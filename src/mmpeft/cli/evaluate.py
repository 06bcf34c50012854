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
    p.add_argument(
        "--noise",
        action="append",
        metavar="MODALITY=LEVEL",
        help="add Gaussian noise to that modality's raw input, std = LEVEL x the input's own std "
        "(repeat or comma-join for several, e.g. --noise image=0.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data.perturb import parse_levels
    from ..train import evaluate_run

    noise = parse_levels(args.noise, "--noise")
    metrics = evaluate_run(args.run, args.split, noise=noise, seed=args.seed)
    out = {args.split: metrics}
    if noise:
        out["noise"] = {"levels": noise, "seed": args.seed}
    print(json.dumps(out, indent=2))
    return 0
