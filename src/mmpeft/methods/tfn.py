"""`tfn`: Tensor Fusion Network (Zadeh et al., "Tensor Fusion Network for Multimodal Sentiment
Analysis", EMNLP 2017, arXiv 1707.07250).

Each modality's pooled feature is projected to ``proj_dim`` (the paper's modality embedding
sub-networks), a constant 1 is appended, and the fused feature is the flattened outer product
over the M modalities: prod_m (proj_dim + 1) values holding every unimodal, bimodal, ...,
M-modal interaction. The post-fusion network is the model's head (set ``head.hidden``).
The width grows exponentially in M; ``max_dim`` guards against building a huge head, and
``lmf`` is the low-rank alternative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..missing import zero_absent
from ..registry import register_method
from .base import Method, MethodConfig


@dataclass
class TFNConfig(MethodConfig):
    proj_dim: int = 16
    """Width each modality's pooled feature is projected to before the outer product."""
    dropout: float = 0.1
    """Dropout after each projection."""
    max_dim: int = 65536
    """Largest fused width (prod of proj_dim + 1 over modalities) allowed; larger is an error."""

    def __post_init__(self) -> None:
        if self.proj_dim < 1:
            raise ConfigError(f"tfn: proj_dim must be >= 1, got {self.proj_dim}")


class ModalityProjection(nn.Module):
    """Pooled feature -> LayerNorm -> Linear -> GELU -> Dropout: (B, dim) -> (B, proj_dim).

    GELU rather than the paper's ReLU so that no projection unit can be dead for a whole batch.
    """

    def __init__(self, dim: int, proj_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, proj_dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled)


def append_one(z: Tensor) -> Tensor:
    """(B, P) -> (B, P + 1) with a trailing constant 1."""
    return torch.cat([z, z.new_ones(z.shape[0], 1)], dim=-1)


def outer_flatten(vectors: list[Tensor]) -> Tensor:
    """Flattened outer product of M vectors per row: [(B, P_m)] -> (B, prod_m P_m)."""
    out = vectors[0]
    for z in vectors[1:]:
        out = (out.unsqueeze(-1) * z.unsqueeze(1)).flatten(1)  # (B, P_1..P_k, 1) * (B, 1, P_k+1)
    return out


class TensorFusion(nn.Module):
    def __init__(self, dims: dict[str, int], proj_dim: int, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.ModuleDict({m: ModalityProjection(d, proj_dim, dropout) for m, d in dims.items()})
        self.out_dim = (proj_dim + 1) ** len(dims)
        self.masks_absent = True  # an absent modality's vector is [0; 1] (model.missing=zeros)

    def forward(self, states, backbone) -> Tensor:
        z = [
            append_one(
                zero_absent(self.proj[m](backbone.encoders[m].pool(states[m])), states, m, self.masks_absent)
            )
            for m in self.proj
        ]  # M x (B, P+1): [0; 1] keeps only the other modalities' terms
        return outer_flatten(z)  # (B, (P+1)^M)


@register_method("tfn")
class TFN(Method):
    config_class = TFNConfig
    provides_fusion = True
    min_modalities = 2
    missing = "an absent modality's vector is [0; 1]: only the others' terms remain"

    @classmethod
    def attach(cls, model, cfg: TFNConfig):
        dims = {m: model.backbone.encoders[m].dim for m in cls.modalities(model, cfg)}
        out_dim = math.prod(cfg.proj_dim + 1 for _ in dims)
        if out_dim > cfg.max_dim:
            raise ConfigError(
                f"tfn: {len(dims)} modalities {sorted(dims)} with proj_dim {cfg.proj_dim} give a fused width "
                f"of {out_dim:,} > max_dim {cfg.max_dim:,}; lower proj_dim, raise max_dim, or use 'lmf'"
            )
        fusion = TensorFusion(dims, cfg.proj_dim, cfg.dropout)
        fusion.masks_absent = model.missing.masks
        model.set_fusion(fusion)
        return fusion
