"""``mmpeft demo``: a few methods on a small real-text multimodal task, offline on CPU (see mmpeft.demo)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from ..demo import DEFAULT_METHODS

    p = sub.add_parser(
        "demo",
        help="compare methods on a small text + sensor task with the real MiniLM text encoder",
        description="Runs offline on CPU in a few minutes; prints a table and saves a plot.",
    )
    p.add_argument(
        "--output", default="mmpeft-demo", metavar="DIR", help="folder for the table, plot and runs"
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods to compare (default: {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--epochs", type=int, default=0, help="epochs per method (0: the demo's default)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run_demo(args.output, methods, epochs=args.epochs or None)
    return 0
