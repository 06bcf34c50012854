"""`late_fusion`: per-modality projections of pooled features, concatenated, then an MLP head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..missing import zero_absent
from ..registry import register_method
from .base import Method, MethodConfig


@dataclass
class LateFusionConfig(MethodConfig):
    proj_dim: int = 64
    """Width each modality's pooled feature is projected to before concatenation."""
    dropout: float = 0.1
    """Dropout after each projection."""


class LateFusion(nn.Module):
    def __init__(self, dims: dict[str, int], proj_dim: int, dropout: float):
        super().__init__()
        self.proj = nn.ModuleDict(
            {
                m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, proj_dim), nn.GELU(), nn.Dropout(dropout))
                for m, d in dims.items()
            }
        )
        self.out_dim = proj_dim * len(dims)
        self.masks_absent = True  # an absent modality's part is 0 (model.missing=zeros)

    def forward(self, states, backbone):
        pooled = [
            zero_absent(self.proj[m](backbone.encoders[m].pool(states[m])), states, m, self.masks_absent)
            for m in self.proj
        ]  # M x (B, P)
        return torch.cat(pooled, dim=-1)  # (B, M * P)


@register_method("late_fusion")
class LateFusionMethod(Method):
    config_class = LateFusionConfig
    provides_fusion = True
    missing = "masks an absent modality's projection to 0"

    @classmethod
    def attach(cls, model, cfg: LateFusionConfig):
        dims = {m: model.backbone.encoders[m].dim for m in cls.modalities(model, cfg)}
        fusion = LateFusion(dims, cfg.proj_dim, cfg.dropout)
        fusion.masks_absent = model.missing.masks
        model.set_fusion(fusion)
        return fusion
