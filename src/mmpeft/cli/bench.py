"""``mmpeft bench``: train several methods on one run config and compare them in one table."""

from __future__ import annotations

import argparse

from .train import add_config_arguments


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="compare methods on a run config: parameters, memory, time and metric in one table",
        description=(
            "Train each method of --methods on the run config (method=NAME, then the overrides), each in "
            "its own process; print a table of trainable parameters, peak memory, training time and the "
            "task's primary metric, and save results.md, results.json and results.png under --output."
        ),
    )
    add_config_arguments(p)
    p.add_argument("--methods", required=True, help="comma-separated methods, e.g. linear,lora,wander,pmf")
    p.add_argument(
        "--output", required=True, metavar="DIR", help="folder for the runs, the table and the plot"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..compare import compare_methods
    from ..run_config import load_run_config, validate_run_config

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    configs = {m: load_run_config(args.config, [f"method={m}", *args.overrides]) for m in methods}
    for config in configs.values():
        validate_run_config(config)  # every config is checked before anything trains
    print(f"mmpeft bench: {args.config}, methods {', '.join(methods)}; output in {args.output}/")
    rows = compare_methods(configs, args.output, title=str(args.config))
    return 1 if any(r.get("failed") for r in rows) else 0
