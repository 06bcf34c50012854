"""`lmf`: Low-rank Multimodal Fusion (Liu et al., "Efficient Low-rank Multimodal Fusion with
Modality-Specific Factors", ACL 2018, arXiv 1806.00064).

TFN's fusion weight W (prod_m (P_m + 1) x out_dim) applied to the outer product of the
[z_m; 1] vectors, with W restricted to rank R: W = sum_i w_i * (W_1^(i) ⊗ ... ⊗ W_M^(i)).
Then W · (⊗_m [z_m; 1]) = sum_i w_i * prod_m ([z_m; 1] W_m^(i)), so the outer product is never
built: cost and parameters are linear in the number of modalities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..missing import zero_absent
from ..registry import register_method
from .base import Method, MethodConfig
from .tfn import ModalityProjection, append_one


@dataclass
class LMFConfig(MethodConfig):
    proj_dim: int = 16
    """Width each modality's pooled feature is projected to before fusion."""
    rank: int = 4
    """Rank R of the fusion weight tensor."""
    out_dim: int = 64
    """Width of the fused feature (the head's input)."""
    dropout: float = 0.1
    """Dropout after each projection."""

    def __post_init__(self) -> None:
        for key in ("proj_dim", "rank", "out_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"lmf: {key} must be >= 1, got {getattr(self, key)}")


class LowRankFusion(nn.Module):
    def __init__(self, dims: dict[str, int], proj_dim: int, rank: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.ModuleDict({m: ModalityProjection(d, proj_dim, dropout) for m, d in dims.items()})
        self.factors = nn.ParameterDict(
            {m: nn.Parameter(torch.empty(rank, proj_dim + 1, out_dim)) for m in dims}  # W_m: (R, P+1, O)
        )
        self.rank_weights = nn.Parameter(torch.empty(1, rank))  # w: (1, R)
        self.bias = nn.Parameter(torch.zeros(out_dim))  # (O,)
        for f in self.factors.values():
            nn.init.xavier_normal_(f)
        nn.init.xavier_normal_(self.rank_weights)
        self.out_dim = out_dim
        self.masks_absent = True  # an absent modality's vector is [0; 1] (model.missing=zeros)

    def fuse(self, z: dict[str, Tensor]) -> Tensor:
        """Projected features per modality {m: (B, P)} -> (B, O)."""
        prod = None
        for m, f in self.factors.items():
            part = torch.einsum("bp,rpo->bro", append_one(z[m]), f)  # (B, R, O)
            prod = part if prod is None else prod * part
        return torch.einsum("r,bro->bo", self.rank_weights[0], prod) + self.bias  # (B, O)

    def forward(self, states, backbone) -> Tensor:
        return self.fuse(
            {
                m: zero_absent(
                    self.proj[m](backbone.encoders[m].pool(states[m])), states, m, self.masks_absent
                )
                for m in self.proj
            }
        )


@register_method("lmf")
class LMF(Method):
    config_class = LMFConfig
    provides_fusion = True
    min_modalities = 2
    missing = "an absent modality's vector is [0; 1]: only the others' factors remain"

    @classmethod
    def attach(cls, model, cfg: LMFConfig):
        dims = {m: model.backbone.encoders[m].dim for m in cls.modalities(model, cfg)}
        fusion = LowRankFusion(dims, cfg.proj_dim, cfg.rank, cfg.out_dim, cfg.dropout)
        fusion.masks_absent = model.missing.masks
        model.set_fusion(fusion)
        return fusion
