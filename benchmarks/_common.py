"""Shared pieces of the benchmark scripts: toy encoder specs, isolated runs, one train step, tables."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from mmpeft.profiling import measure_train_step
from mmpeft.report import trainable_and_total


def toy_encoder(dim: int, depth: int, seq: int, heads: int = 4, input_dim: int = 64) -> dict:
    config = {"input_dim": input_dim, "dim": dim, "depth": depth, "heads": heads, "max_len": seq}
    return {"type": "toy", "config": config}


def random_inputs(encoders: dict, batch: int, seq: int, device: str) -> dict:
    return {
        m: {"values": torch.randn(batch, seq, e["config"]["input_dim"], device=device)}
        for m, e in encoders.items()
    }


def isolated(script: str, argv: list[str]) -> dict:
    """Run ``script --only ...`` in a fresh process (peak memory must not leak between runs)."""
    out = subprocess.run([sys.executable, script, *argv], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def train_step_numbers(model, forward, batch: int, num_classes: int, device: str, repeats: int) -> dict:
    """Measure ``forward()`` (-> logits) + cross-entropy + backward + AdamW step of ``model``."""
    target = torch.randint(0, num_classes, (batch,), device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(forward(), target)
        loss.backward()
        opt.step()
        return loss

    trainable, total = trainable_and_total(model)
    numbers = measure_train_step(step, model.parameters(), repeats=repeats, device=device)
    return {"trainable": trainable, "total": total, **numbers}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    print("| " + " | ".join(h for _, h, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join(format(r[k], f) for k, _, f in columns) + " |")
