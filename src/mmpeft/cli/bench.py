"""``mmpeft bench``: train several methods (over several seeds) on one run config; one table."""

from __future__ import annotations

import argparse

from ..config import ConfigError
from .train import add_config_arguments


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="compare methods on a run config: parameters, memory, time and metric in one table",
        description=(
            "Train each method of --methods on the run config (method=NAME, the config's recipe for "
            "it, the overrides, then its --method-overrides), each seed in its own process; print a "
            "table of trainable parameters, peak memory, training time and the task's primary metric "
            "(mean ± std over --seeds), and save results.md, results.json and results.png under --output."
        ),
    )
    add_config_arguments(p)
    p.add_argument("--methods", required=True, help="comma-separated methods, e.g. linear,lora,wander,pmf")
    p.add_argument(
        "--output", required=True, metavar="DIR", help="folder for the runs, the table and the plot"
    )
    p.add_argument(
        "--seeds",
        metavar="K,K,...",
        help="comma-separated train.seed values, each run into DIR/<method>/seed<K>; the table gives "
        "mean ± sample std (default: one run with the config's seed, into DIR/<method>)",
    )
    p.add_argument(
        "--method-overrides",
        metavar="FILE",
        help="YAML mapping method -> list of key.sub=value overrides, applied after the common ones "
        "(e.g. `wander: [train.lr=3e-3, model.methods.0.k=4]`)",
    )
    p.add_argument("--chance", type=float, help="the metric of guessing: a line in the plot and a note")
    p.set_defaults(handler=run)


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def read_method_overrides(path: str | None, methods: list[str]) -> dict[str, list[str]]:
    """``--method-overrides FILE`` -> {method: [overrides]}; every key must be one of ``methods``."""
    if path is None:
        return {}
    from ..registry import closest
    from ..run_config import check_recipes, parse_yaml

    with open(path, encoding="utf-8") as f:
        data = parse_yaml(f.read())
    check_recipes(data, where=path)
    for method in data:
        if method not in methods:
            raise ConfigError(f"{path}: {method!r} is not in --methods; {closest(method, methods)}")
    return {m: overrides or [] for m, overrides in data.items()}


def run(args: argparse.Namespace) -> int:
    from ..compare import compare_methods
    from ..run_config import load_run_config, validate_run_config

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = parse_seeds(args.seeds)
    extra = read_method_overrides(args.method_overrides, methods)
    configs = {
        m: load_run_config(args.config, [f"method={m}", *args.overrides, *extra.get(m, [])]) for m in methods
    }
    for config in configs.values():
        validate_run_config(config)  # every config is checked before anything trains
    runs = f", seeds {', '.join(map(str, seeds))}" if seeds else ""
    print(f"mmpeft bench: {args.config}, methods {', '.join(methods)}{runs}; output in {args.output}/")
    rows = compare_methods(configs, args.output, seeds=seeds, title=str(args.config), chance=args.chance)
    return 1 if any(r["failed_seeds"] for r in rows) else 0
