"""`lora`: low-rank updates on the canonical linears (Hu et al., LoRA, arXiv 2106.09685).

The frozen linear is hooked, never replaced: y = W x + b + (alpha / r) * B A dropout(x), with A
random and B zero, so the model is the frozen one at step 0. Targets are canonical names
(``q k v o fc1 fc2``); on families with a fused ``qkv`` projection a ``q``/``k``/``v`` target
updates its slice of the fused output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..registry import register_method
from .base import BlockwiseMethod, MethodConfig, add_on_rows, resolve_linear


@dataclass
class LoRAConfig(MethodConfig):
    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the update's input."""
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    """Canonical linears to adapt (q, k, v, o, fc1, fc2)."""


class LoRADelta(nn.Module):
    """The low-rank update of one linear: (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return (self.dropout(x) @ self.A.t() @ self.B.t()) * self.scale


def add_to_output(delta: LoRADelta, rows: slice | None):
    return lambda x, y: add_on_rows(y, delta(x), rows)


@register_method("lora")
class LoRA(BlockwiseMethod):
    config_class = LoRAConfig
    identity_at_init = True

    @classmethod
    def attach_block(cls, model, modality: str, layer: int, cfg: LoRAConfig) -> nn.ModuleDict:
        linears = model.backbone.encoders[modality].linears(layer)
        deltas = nn.ModuleDict()
        for target in cfg.targets:
            t = resolve_linear("lora", modality, linears, target)
            deltas[target] = LoRADelta(t.in_features, t.out_features, cfg.r, cfg.alpha, cfg.dropout)
            model.backbone.hook(modality, layer, t.name, add_to_output(deltas[target], t.rows))
        return deltas
