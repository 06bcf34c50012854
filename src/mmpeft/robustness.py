"""``mmpeft robustness``: how a trained run degrades as each modality goes missing.

For every modality of the run's model and every rate (default 0, 0.3, 0.5, 0.7, 1.0) the chosen
split is scored with that modality removed from that fraction of the examples (``--missing``'s
draws: per example, seeded, a higher rate removes a superset of a lower one). Writes
``robustness.json``, ``robustness.md`` (one row per modality, one column per rate, the task's
primary metric) and ``robustness.png`` into the output folder.
"""

from __future__ import annotations

import json
import logging
import os

from .checkpoint import atomic_write_bytes

DEFAULT_RATES = (0.0, 0.3, 0.5, 0.7, 1.0)


def sweep(evaluator, rates=DEFAULT_RATES, split: str = "test", seed: int = 0) -> dict:
    """{"metric", "rates", "scores": {modality: [primary metric per rate]}, "all": {modality: [metrics]}}."""
    task = evaluator.comps.task
    clean = evaluator.score(split, seed=seed)
    scores, everything = {}, {}
    for m in evaluator.modalities:
        rows = [clean if r == 0 else evaluator.score(split, missing={m: r}, seed=seed) for r in rates]
        scores[m] = [row[task.primary] for row in rows]
        everything[m] = rows
    return {
        "run": evaluator.run_dir,
        "split": split,
        "seed": seed,
        "metric": task.primary,
        "higher_is_better": task.higher_is_better,
        "rates": list(rates),
        "scores": scores,
        "all": everything,
    }


def table(result: dict) -> str:
    rates = result["rates"]
    head = "| missing modality | " + " | ".join(f"{r:g}" for r in rates) + " |"
    lines = [
        f"{result['split']} {result['metric']} of `{result['run']}` with one modality missing from a "
        "fraction of the examples (columns: the fraction)",
        "",
        head,
        "|---" * (len(rates) + 1) + "|",
    ]
    for m, values in result["scores"].items():
        lines.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, values in result["scores"].items():
        ax.plot(result["rates"], values, marker="o", label=f"{m} missing")
    ax.set_xlabel("fraction of examples missing the modality")
    ax.set_ylabel(f"{result['split']} {result['metric']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, name) for name in ("robustness.json", "robustness.md", "robustness.png")]
    atomic_write_bytes(paths[0], json.dumps(result, indent=2).encode())
    atomic_write_bytes(paths[1], table(result).encode())
    try:
        plot(result, paths[2])
    except ImportError:
        paths.pop()  # matplotlib comes with mmpeft[train]; the table is written regardless
    return paths
