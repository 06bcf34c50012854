"""``mmpeft tune``: hyper-parameter search on the validation split with Optuna, then a refit."""

from __future__ import annotations

import argparse

from .train import add_config_arguments

EPILOG = """\
search space: dotted paths of the run config (as the overrides), each a range:
  {type: float, low: 1.0e-5, high: 1.0e-2, log: true}   {type: int, low: 1, high: 8, step: 1}
  {type: categorical, choices: [4, 8, 16]}   or just [4, 8, 16];   null drops a default entry.
Defaults: train.lr (x0.1..x10, log), train.weight_decay (0, 1e-5, 1e-4, ..., 1e-1),
train.epochs (x0.5..x1.5), and the attached methods' r, rank, k, proj_dim, out_dim, enhancer_dim
(x1/4..x4 in powers of two), num_prompts, num_qp, num_qcp, num_fcp (x0.25..x4, log), dropout and
enhancer_dropout (0..0.3), scale and alpha (x0.25..x4, log). A `tune:` section of the run config,
then --space FILE, change or extend them; --print-space shows the result.

The study is kept in DIR/study.db: run the same command again to resume a killed or timed-out
search (--trials counts finished trials over all runs). Trials go to DIR/trials/<n> and never
touch the test split; the best is saved as DIR/best.json and DIR/best_config.yaml, then trained
once more into DIR/best with its test split scored (skip with --no-refit).

  mmpeft tune --config toy method=lora train.epochs=4 --output runs/tune-lora --trials 20
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="search hyper-parameters on the validation split (Optuna), then refit the best",
        description=(
            "Search the hyper-parameters of a run config with Optuna: each trial trains it with sampled "
            "values and is scored on the validation split (pruned early when hopeless)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p)
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the study, trials and best run")
    p.add_argument(
        "--trials", required=True, type=int, metavar="N", help="finished trials in total (resumes count)"
    )
    p.add_argument(
        "--timeout", type=float, metavar="S", help="start no new trial after S seconds of this run"
    )
    p.add_argument(
        "--pruner", choices=["median", "hyperband", "none"], default="median", help="default: median"
    )
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="default: tpe")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    p.add_argument("--space", metavar="FILE", help="YAML search space, applied over the config's `tune:`")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL (default: sqlite:///DIR/study.db)")
    p.add_argument("--study-name", metavar="NAME", help="study name (default: the basename of DIR)")
    p.add_argument("--no-refit", action="store_true", help="do not train the best config into DIR/best")
    p.add_argument("--print-space", action="store_true", help="print the search space as YAML and exit")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..run_config import dump_yaml, load_run_config
    from ..tune import read_space, search_space, tune

    config = load_run_config(args.config, args.overrides)
    space = read_space(args.space) if args.space else None
    if args.print_space:
        print(dump_yaml(search_space(config, space)), end="")
        return 0
    if args.trials < 1:
        raise ConfigError(f"tune: --trials must be >= 1, got {args.trials}")
    tune(
        config,
        args.output,
        trials=args.trials,
        timeout_s=args.timeout,
        sampler=args.sampler,
        pruner=args.pruner,
        storage=args.storage,
        study_name=args.study_name,
        space=space,
        seed=args.seed,
        refit=not args.no_refit,
    )
    return 0
