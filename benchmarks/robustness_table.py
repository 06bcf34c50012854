"""One table from the robustness sweeps of several runs (``mmpeft robustness`` wrote each).

    python benchmarks/robustness_table.py runs/miss-*-plain runs/miss-*-drop

A row per run: the method, whether it trained with modality dropout, its trainable parameters,
the clean test score and the score with each modality missing from 50 % and from all examples.
"""

from __future__ import annotations

import json
import os
import sys


def row(run: str) -> dict | None:
    try:
        with open(os.path.join(run, "robustness", "robustness.json")) as f:
            sweep = json.load(f)
        with open(os.path.join(run, "metrics.json")) as f:
            metrics = json.load(f)
        with open(os.path.join(run, "config.yaml")) as f:
            dropout = "modality_dropout: null" not in f.read()
    except OSError:
        return None
    return {"run": run, "sweep": sweep, "params": metrics["trainable_params"], "dropout": dropout}


def main(runs: list[str]) -> None:
    rows = [r for r in map(row, sorted(set(runs))) if r is not None]
    if not rows:
        sys.exit("no run with robustness/robustness.json among the arguments")
    first = rows[0]["sweep"]
    mods, rates = list(first["scores"]), first["rates"]
    wanted = [r for r in (0.5, 1.0) if r in rates]
    head = ["run", "dropout", "trainable", f"clean {first['metric']}"]
    head += [f"{m} missing {r:g}" for m in mods for r in wanted]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for r in rows:
        scores = r["sweep"]["scores"]
        cells = [os.path.basename(r["run"]), "yes" if r["dropout"] else "no", f"{r['params']:,}",
                 f"{scores[mods[0]][0]:.3f}"]  # fmt: skip
        cells += [f"{scores[m][rates.index(x)]:.3f}" for m in mods for x in wanted]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
