"""Train several methods on one run config and put them in one table (``mmpeft bench``, the demo).

Each method trains in a fresh process, so its peak-memory figure is its own. For every method the
table gives trainable parameters, peak memory, training time (prefix-cache build included) and the
task's primary metric on val and test; ``results.md``, ``results.json`` and a plot are saved.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable


def train_one(config: dict, run_dir: str, reader_factory: Callable | None) -> None:
    """Train one run config (in a child process) and write ``run_dir/metrics.json``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    from .train import Trainer

    Trainer(config, run_dir, reader=reader_factory() if reader_factory else None).fit()


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
    reader_factory: Callable | None = None,
    title: str = "",
    chance: float | None = None,
    preload: list[str] | None = None,
) -> list[dict]:
    """Train each ``configs[method]`` in its own process; print, save and plot the table."""
    os.makedirs(output, exist_ok=True)
    rows = []
    ctx = process_context(preload or [])
    for method, config in configs.items():
        run_dir = os.path.join(output, method)
        print(f"  {method:<12} training ...", end="\r", flush=True)
        t0 = time.perf_counter()
        proc = ctx.Process(target=train_one, args=(config, run_dir, reader_factory))
        proc.start()
        proc.join()
        wall = time.perf_counter() - t0
        metrics_file = os.path.join(run_dir, "metrics.json")
        if proc.exitcode != 0 or not os.path.isfile(metrics_file):
            print(f"  {method:<12} FAILED (exit code {proc.exitcode}); see the messages above")
            rows.append({"method": method, "failed": True})
            continue
        with open(metrics_file) as f:
            rows.append(row_of(method, json.load(f), wall))
        r = rows[-1]
        print(f"  {method:<12} done in {wall:5.1f} s, test {r['metric']} {r['test']:.3f}")
    table = format_table(rows, chance)
    print("\n" + table)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot(rows, os.path.join(output, "results.png"), title, chance)
    print(f"\nplot: {os.path.join(output, 'results.png')}")
    return rows


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


def format_table(rows: list[dict], chance: float | None = None) -> str:
    ok = [r for r in rows if not r.get("failed")]
    metric = ok[0]["metric"] if ok else "metric"
    memory = "peak RSS (MB)" if ok and ok[0]["peak_memory_kind"].startswith("cpu") else "peak GPU memory (MB)"
    lines = [
        f"| method | trainable params | % of model | {memory} | train time (s) | val {metric} | test {metric} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['method']} | failed | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | "
            f"{r['peak_memory_mb']:.0f} | {r['train_time_s'] + r['cache_time_s']:.1f} | "
            f"{r['val']:.3f} | {r['test']:.3f} |"
        )
    lines.append("")
    note = "train time includes building the prefix cache"
    lines.append(note + (f"; chance {metric} is about {chance:g}." if chance is not None else "."))
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "", chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("failed")]
    if not ok:
        return
    metric = ok[0]["metric"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar([r["method"] for r in ok], [r["test"] for r in ok], color="tab:blue")
    if chance is not None:
        left.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
        left.legend()
    left.set_ylabel(f"test {metric}")
    left.set_title(f"{title}: test {metric}" if title else f"test {metric}")
    for r in ok:
        right.scatter(r["trainable_params"], r["test"], s=40)
        right.annotate(
            r["method"], (r["trainable_params"], r["test"]), textcoords="offset points", xytext=(4, 4)
        )
    right.set_xscale("log")
    right.set_xlabel("trainable parameters")
    right.set_ylabel(f"test {metric}")
    right.set_title(f"{metric} vs trainable parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
