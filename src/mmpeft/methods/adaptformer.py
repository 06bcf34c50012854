"""`adaptformer`: a parallel bottleneck beside each FFN (Chen et al., "AdaptFormer: Adapting Vision
Transformers for Scalable Visual Recognition", NeurIPS 2022, arXiv 2205.13535).

With x' the input of the FFN sub-layer (the attention sub-layer's output),
    y = x' + FFN(LN x') + s * up(ReLU(down(LN_a x')))        (LN_a optional, off by default)
Pre-LN blocks (ViT): x' is the input of the block's ``ln_ffn`` norm, captured by an input hook
that returns it unchanged; the adapter output is added to the output of ``fc2``, i.e. to the FFN
branch before the residual add. Post-LN blocks (BERT): x' is the input of ``fc1`` (the attention
sub-layer output after its LayerNorm) and the adapter output is added to ``fc2``'s output, i.e.
inside the block's output LayerNorm: y = LN(x' + FFN(x') + s * A(x')). ``up`` is zero-initialised,
so the model is the frozen one at step 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ..config import ConfigError
from ..registry import register_method
from .base import BlockwiseMethod, MethodConfig


@dataclass
class AdaptFormerConfig(MethodConfig):
    r: int = 64
    """Bottleneck width of each parallel adapter."""
    scale: float = 0.1
    """Scale s of the adapter branch."""
    dropout: float = 0.1
    """Dropout on the bottleneck activations."""
    layernorm: bool = False
    """Apply a learned LayerNorm (LN_a) to x' before the down-projection."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"adaptformer: bottleneck r must be >= 1, got {self.r}")


class ParallelAdapter(nn.Module):
    """x' -> s * up(dropout(ReLU(down(LN_a x')))): (..., dim) -> (..., dim), zero at init."""

    def __init__(self, dim: int, r: int, scale: float = 0.1, dropout: float = 0.1, layernorm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if layernorm else nn.Identity()
        self.down = nn.Linear(dim, r)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(r, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.dropout(self.act(self.down(self.norm(x))))) * self.scale  # (..., dim)


@register_method("adaptformer")
class AdaptFormer(BlockwiseMethod):
    config_class = AdaptFormerConfig
    identity_at_init = True

    @classmethod
    def attach_block(cls, model, modality: str, layer: int, cfg: AdaptFormerConfig) -> ParallelAdapter:
        encoder = model.backbone.encoders[modality]
        adapter = ParallelAdapter(encoder.dim, cfg.r, cfg.scale, cfg.dropout, cfg.layernorm)
        model.backbone.add_parallel_to_ffn(modality, layer, adapter)
        return adapter
