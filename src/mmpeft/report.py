"""Trainable-parameter report with a per-modality breakdown (PEFT's ``print_trainable_parameters``)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import MultimodalModel


def parameter_counts(model: MultimodalModel) -> dict[str, dict[str, int]]:
    """{method key: {modality or part: trainable count}}; base weights that train count as 'encoders'."""
    modalities = set(model.backbone.modalities)
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        if parts[0] == "peft":
            method = parts[1]
            part = next((x for x in parts[2:] if x in modalities), "shared")
        else:  # unfrozen base weights: backbone.encoders.<modality>....
            method, part = "encoders", parts[2]
        table[method][part] += p.numel()
    return {k: dict(v) for k, v in table.items()}


def trainable_and_total(model: MultimodalModel) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def format_parameter_report(model: MultimodalModel) -> str:
    trainable, total = trainable_and_total(model)
    lines = [
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    ]
    for method, parts in parameter_counts(model).items():
        detail = ", ".join(f"{part} {n:,}" for part, n in sorted(parts.items()))
        lines.append(f"  {method}: {sum(parts.values()):,} ({detail})")
    return "\n".join(lines)
