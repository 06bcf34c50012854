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
from .base import Method, MethodConfig


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


class InputTap:
    """Holds the FFN sub-layer input between the capture hook and the ``fc2`` output hook."""

    def __init__(self, where: str):
        self.where = where
        self.x: Tensor | None = None

    def capture(self, x: Tensor) -> Tensor:
        self.x = x  # (B, T, D)
        return x

    def add_adapter(self, adapter: ParallelAdapter):
        def hook(_: Tensor, y: Tensor) -> Tensor:
            if self.x is None:
                raise RuntimeError(f"adaptformer: fc2 ran before {self.where}; the block order is unexpected")
            x, self.x = self.x, None
            return y + adapter(x)  # (B, T, D)

        return hook


@register_method("adaptformer")
class AdaptFormer(Method):
    config_class = AdaptFormerConfig
    identity_at_init = True

    @classmethod
    def attach(cls, model, cfg: AdaptFormerConfig):
        container = nn.ModuleDict()
        for m in cls.modalities(model, cfg):
            per_layer = nn.ModuleDict()
            for i in cls.layers(model, m, cfg):
                per_layer[str(i)] = cls.attach_block(model, m, i, cfg)
            container[m] = per_layer
        return container

    @classmethod
    def attach_block(cls, model, modality: str, layer: int, cfg: AdaptFormerConfig) -> ParallelAdapter:
        encoder = model.backbone.encoders[modality]
        linears = encoder.linears(layer)
        if "fc2" not in linears:
            raise ValueError(f"adaptformer: encoder {modality!r} block {layer} has no linear 'fc2'")
        if encoder.pre_norm:  # x' enters the FFN's own LayerNorm
            source, on_norm = "ln_ffn", True
            if source not in encoder.norms(layer):
                raise ValueError(
                    f"adaptformer: pre-LN encoder {modality!r} block {layer} exposes no 'ln_ffn' norm"
                )
        else:  # post-LN: fc1 reads the attention sub-layer's (normalised) output directly
            source, on_norm = "fc1", False
            if source not in linears:
                raise ValueError(f"adaptformer: encoder {modality!r} block {layer} has no linear 'fc1'")
        adapter = ParallelAdapter(encoder.dim, cfg.r, cfg.scale, cfg.dropout, cfg.layernorm)
        tap = InputTap(f"{'norm' if on_norm else 'linear'} {source!r} of encoder {modality!r} block {layer}")
        model.backbone.hook(modality, layer, source, tap.capture, on="input")
        model.backbone.hook(modality, layer, "fc2", tap.add_adapter(adapter))
        return adapter
