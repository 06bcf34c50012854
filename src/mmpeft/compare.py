"""Train several methods on one run config and put them in one table (``mmpeft bench``, the demo).

Each (method, seed) trains in a fresh process, so its peak-memory figure is its own. For every
method the table gives trainable parameters, peak memory, training time (prefix-cache build
included) and the task's primary metric on val and test; with several seeds, the mean and the
sample standard deviation over them, and how many seeds finished. ``results.md``,
``results.json`` (every seed's raw numbers included) and a plot are saved.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable


def train_one(config: dict, run_dir: str, reader_factory: Callable | None, label: str = "") -> None:
    """Train one run config (in a child process) and write ``run_dir/metrics.json``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    from .train import Trainer

    trainer = Trainer(config, run_dir, reader=reader_factory() if reader_factory else None)
    trainer.progress_label = label  # the progress bar (on a terminal) says which run it is
    trainer.fit()


def process_context(preload: list[str]):
    """Fresh processes per method: forkserver (imports done once, in the server) where available."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["mmpeft.compare", "mmpeft.train", *preload])
        return ctx
    return multiprocessing.get_context("spawn")


def compare_methods(
    configs: dict[str, dict],
    output: str,
    *,
    seeds: list[int] | None = None,
    reader_factory: Callable | None = None,
    title: str = "",
    chance: float | None = None,
    preload: list[str] | None = None,
) -> list[dict]:
    """Train each ``configs[method]`` in its own process; print, save and plot the table.

    ``seeds``: train every method once per seed (``train.seed``), into ``output/<method>/seed<k>``,
    and report mean ± std; None: once with the config's own seed, into ``output/<method>``.
    """
    os.makedirs(output, exist_ok=True)
    ctx = process_context(preload or [])
    rows = []
    for method, config in configs.items():
        runs = []
        for seed in seeds if seeds is not None else [None]:
            run_config, run_dir, label = config, os.path.join(output, method), method
            if seed is not None:
                run_config = copy.deepcopy(config)
                run_config["train"] = {**(run_config.get("train") or {}), "seed": seed}
                run_dir, label = os.path.join(run_dir, f"seed{seed}"), f"{method} seed {seed}"
            else:
                seed = (config.get("train") or {}).get("seed", 0)
            runs.append(run_in_process(ctx, run_config, run_dir, reader_factory, label, seed))
        row = summarize(method, runs)
        row["attached"] = [e.get("name") for e in (config.get("model") or {}).get("methods") or []]
        rows.append(row)
    rows = with_earlier_rows(rows, os.path.join(output, "results.json"))
    table = format_table(rows, chance, seeds=seeds is not None)
    print("\n" + table)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot(rows, os.path.join(output, "results.png"), title, chance)
    print(f"\nplot: {os.path.join(output, 'results.png')}")
    return rows


def with_earlier_rows(rows: list[dict], results_file: str) -> list[dict]:
    """This call's rows, after the rows of methods that an earlier bench into the same folder ran
    and this one did not (two bench calls into one folder give one table)."""
    if not os.path.isfile(results_file):
        return rows
    try:
        with open(results_file) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return rows
    ran = {r["method"] for r in rows}
    kept = [r for r in earlier if isinstance(r, dict) and r.get("method") not in ran]
    return kept + rows


def run_in_process(ctx, config: dict, run_dir: str, reader_factory, label: str, seed: int) -> dict:
    """One training run in a fresh process -> its raw numbers (``row_of``), or a failed record."""
    earlier = finished_metrics(config, run_dir)
    if earlier is not None:  # a bench run again after a kill keeps what finished
        print(f"  {label:<12} finished earlier in {run_dir}, test {earlier['test'].get(earlier['primary'])}")
        return run_record(label, seed, run_dir, earlier, math.nan)
    # on a terminal the "done" line overwrites this one; in a log file each gets its own line
    print(f"  {label:<12} training ...", end="\r" if sys.stdout.isatty() else "\n", flush=True)
    t0 = time.perf_counter()
    proc = ctx.Process(target=train_one, args=(config, run_dir, reader_factory, label))
    proc.start()
    proc.join()
    wall = time.perf_counter() - t0
    metrics_file = os.path.join(run_dir, "metrics.json")
    if proc.exitcode != 0 or not os.path.isfile(metrics_file):
        print(f"  {label:<12} FAILED (exit code {proc.exitcode}); see the messages above")
        return {"seed": seed, "run_dir": run_dir, "failed": True, "exit_code": proc.exitcode}
    with open(metrics_file) as f:
        metrics = json.load(f)
    run = run_record(label, seed, run_dir, metrics, wall)
    print(f"  {label:<12} done in {wall:5.1f} s, test {run['metric']} {run['test']:.3f}")
    return run


def run_record(label: str, seed: int, run_dir: str, metrics: dict, wall: float) -> dict:
    run = {"seed": seed, "run_dir": run_dir, **row_of(label, metrics, wall)}
    run.pop("method")
    run["val_metrics"], run["test_metrics"] = metrics["val"], metrics["test"]
    return run


def finished_metrics(config: dict, run_dir: str) -> dict | None:
    """The metrics of a run that already finished in ``run_dir`` with this same config, else None."""
    from .config import ConfigError
    from .run_config import check_same_config, read_yaml, validate_run_config

    metrics_file, config_file = os.path.join(run_dir, "metrics.json"), os.path.join(run_dir, "config.yaml")
    if not (os.path.isfile(metrics_file) and os.path.isfile(config_file)):
        return None
    try:
        saved, wanted = read_yaml(config_file), validate_run_config(copy.deepcopy(config)).config
        for c in (saved, wanted):  # the head size is filled in from the data when a run starts
            c.get("model", {}).get("head", {}).pop("num_outputs", None)
        check_same_config(saved, wanted, config_file)
        with open(metrics_file) as f:
            return json.load(f)
    except (ConfigError, ValueError, OSError):
        return None


def row_of(method: str, metrics: dict, wall: float) -> dict:
    primary = metrics["primary"]
    return {
        "method": method,
        "metric": primary,
        "trainable_params": metrics["trainable_params"],
        "trainable_percent": metrics["trainable_percent"],
        "peak_memory_mb": metrics["peak_memory_mb"],
        "peak_memory_kind": metrics["peak_memory_kind"],
        "train_time_s": metrics["train_time_s"],
        "cache_time_s": (metrics.get("prefix_cache") or {}).get("build_time_s", 0.0),
        "samples_per_s": metrics.get("samples_per_s", math.nan),
        "wall_time_s": wall,
        "val": metrics["val"].get(primary, math.nan),
        "test": metrics["test"].get(primary, math.nan),
    }


MEANS = ["peak_memory_mb", "train_time_s", "cache_time_s", "samples_per_s", "wall_time_s"]


def summarize(method: str, runs: list[dict]) -> dict:
    """One table row from a method's runs: means (± sample std of val and test) over the finished
    seeds; the failed ones are counted (``failed_seeds``), never left out silently."""
    ok = [r for r in runs if not r.get("failed")]
    row: dict = {
        "method": method,
        "seeds": [r["seed"] for r in runs],
        "n_seeds": len(ok),
        "failed_seeds": [r["seed"] for r in runs if r.get("failed")],
        "failed": not ok,
    }
    if ok:
        same = ("metric", "trainable_params", "trainable_percent", "peak_memory_kind")
        row.update({k: ok[0][k] for k in same})
        row.update({k: statistics.fmean(r[k] for r in ok) for k in MEANS})
        for split in ("val", "test"):
            values = [r[split] for r in ok]
            row[split] = statistics.fmean(values)
            row[f"{split}_std"] = sample_std(values)
    row["runs"] = runs
    return row


def sample_std(values: list[float]) -> float | None:
    """Standard deviation with n - 1 (None for one value; NaN if a value is NaN)."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_std(mean: float, std: float | None) -> str:
    """``0.912 ± 0.011``; just ``0.912`` without a std (one seed)."""
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def seeds_cell(row: dict) -> str:
    """How many seeds finished: ``3``, or ``2/3 (seed 1 failed)``."""
    n = len(row["seeds"])
    if not row["failed_seeds"]:
        return str(n)
    failed = ", ".join(str(s) for s in row["failed_seeds"])
    word = "seed" if len(row["failed_seeds"]) == 1 else "seeds"
    return f"{row['n_seeds']}/{n} ({word} {failed} failed)"


def method_label(row: dict) -> str:
    """The method's name, plus whatever else its recipe attached (``uniadapter (+ temporal_transformer)``)."""
    others = [m for m in row.get("attached") or [] if m != row["method"]]
    return f"{row['method']} (+ {', '.join(others)})" if others else row["method"]


def format_table(rows: list[dict], chance: float | None = None, seeds: bool = False) -> str:
    """Markdown table; ``seeds``: add the seeds column and say that values are mean ± std."""
    ok = [r for r in rows if not r.get("failed")]
    metric = ok[0]["metric"] if ok else "metric"
    memory = "peak RSS (MB)" if ok and ok[0]["peak_memory_kind"].startswith("cpu") else "peak GPU memory (MB)"
    columns = ["method", *(["seeds"] if seeds else []), "trainable params", "% of model", memory,
               "train time (s)", f"val {metric}", f"test {metric}"]  # fmt: skip
    lines = [
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ]
    for r in rows:
        cells = [method_label(r), *([seeds_cell(r)] if seeds else [])]
        if r.get("failed"):
            cells.append("failed")
        else:
            cells += [
                f"{r['trainable_params']:,}",
                f"{r['trainable_percent']:.3f}",
                f"{r['peak_memory_mb']:.0f}",
                f"{r['train_time_s'] + r['cache_time_s']:.1f}",
                mean_std(r["val"], r.get("val_std")),
                mean_std(r["test"], r.get("test_std")),
            ]
        cells += [""] * (len(columns) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    note = "train time includes building the prefix cache"
    if seeds:
        note += "; metrics are mean ± sample std over the finished seeds, memory and time are means"
    lines.append(note + (f"; chance {metric} is about {chance:g}." if chance is not None else "."))
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "", chance: float | None = None) -> None:
    """Test metric (± std over seeds) against trainable parameters (log x) and against train time."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("failed")]
    if not ok:
        return
    metric = ok[0]["metric"]
    probe = next((r for r in ok if r["method"] == "linear"), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in [
        (axes[0], "trainable_params", "trainable parameters"),
        (axes[1], "train_time_s", "train time (s, prefix cache included)"),
    ]:
        for r in ok:
            x = r[key] + (r["cache_time_s"] if key == "train_time_s" else 0)
            ax.errorbar(x, r["test"], yerr=r.get("test_std") or 0.0, fmt="o", capsize=3)
            ax.annotate(r["method"], (x, r["test"]), textcoords="offset points", xytext=(4, 4))
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
        if probe is not None:
            ax.axhline(probe["test"], color="tab:gray", linestyle=":", linewidth=1, label="linear probe")
        if chance is not None or probe is not None:
            ax.legend()
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric}")
    axes[0].set_xscale("log")
    axes[0].set_title(f"{title}: {metric} vs trainable parameters" if title else f"{metric} vs parameters")
    axes[1].set_title(f"{metric} vs train time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
