"""`bitfit`: train only bias terms (Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning
for Transformer-based Masked Language-models", ACL 2022, arXiv 2106.10199).

Base weights are never rewritten, so the biases are not unfrozen in place: every chosen linear
(and LayerNorm) gets a zero-initialised learned delta added to its output through a hook,
y = W x + b + delta. For a module with a bias this is exactly training that bias (b + delta);
for one without a bias it adds the bias the paper would train. The model is the frozen one at
step 0, and the encoder's state-dict keys never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..registry import register_method
from .base import BlockwiseMethod, MethodConfig, add_on_rows, resolve_linear


@dataclass
class BitFitConfig(MethodConfig):
    targets: list[str] | None = None
    """Canonical linears whose bias trains (q, k, v, qkv, o, fc1, fc2); None: every linear of the block."""
    include_norms: bool = True
    """Also train the LayerNorm biases (``ln_attn``, ``ln_ffn``) of the chosen blocks."""


class BiasDelta(nn.Module):
    """A learned, zero-initialised bias (width,), added to a module's output by ``add_bias``."""

    def __init__(self, width: int):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(width))


def add_bias(delta: BiasDelta, rows: slice | None):
    return lambda x, y: add_on_rows(y, delta.delta, rows)


def norm_width(module: nn.Module, modality: str, name: str) -> int:
    shape = getattr(module, "normalized_shape", None)
    if shape is None and getattr(module, "weight", None) is not None:
        shape = module.weight.shape
    if not shape:
        raise ValueError(f"bitfit: cannot tell the width of norm {name!r} of encoder {modality!r}")
    return int(shape[-1])


@register_method("bitfit")
class BitFit(BlockwiseMethod):
    config_class = BitFitConfig
    identity_at_init = True

    @classmethod
    def attach_block(cls, model, modality: str, layer: int, cfg: BitFitConfig) -> nn.ModuleDict:
        encoder = model.backbone.encoders[modality]
        linears = encoder.linears(layer)
        deltas = nn.ModuleDict()
        for target in list(linears) if cfg.targets is None else cfg.targets:
            t = resolve_linear("bitfit", modality, linears, target)
            deltas[target] = BiasDelta(t.out_features)
            model.backbone.hook(modality, layer, t.name, add_bias(deltas[target], t.rows))
        if cfg.include_norms:
            for name, norm in encoder.norms(layer).items():
                deltas[name] = BiasDelta(norm_width(norm, modality, name))
                model.backbone.hook(modality, layer, name, add_bias(deltas[name], None))
        return deltas
