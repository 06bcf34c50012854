"""`adapter`: sequential bottleneck adapters.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019, arXiv 1902.00751;
Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
EACL 2021, arXiv 2005.00247.

An adapter maps a sub-layer's output h to h + scale * up(act(down(h))), inside the sub-layer's
residual branch. ``houlsby`` places one after the attention output projection (``o``) and one
after the FFN output projection (``fc2``); ``pfeiffer`` only after the FFN. The frozen
projections are hooked, not replaced; ``up`` is zero-initialised so the model is the frozen one
at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from ..config import ConfigError
from ..registry import register_method
from .base import BlockwiseMethod, MethodConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = {"houlsby": ("o", "fc2"), "pfeiffer": ("fc2",)}


@dataclass
class AdapterConfig(MethodConfig):
    r: int = 64
    """Bottleneck width of each adapter."""
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Non-linearity between the down- and up-projection."""
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    """houlsby: after the attention output and the FFN output; pfeiffer: after the FFN output only."""
    dropout: float = 0.0
    """Dropout on the bottleneck activations."""
    scale: float = 1.0
    """Multiplier of the adapter's output before it joins the residual."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"adapter: bottleneck r must be >= 1, got {self.r}")


class BottleneckAdapter(nn.Module):
    """h -> scale * up(dropout(act(down(h)))): (..., dim) -> (..., dim), zero at init."""

    def __init__(self, dim: int, r: int, activation: str = "relu", dropout: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.down = nn.Linear(dim, r)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(r, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, h: Tensor) -> Tensor:
        return self.up(self.dropout(self.act(self.down(h)))) * self.scale  # (..., dim)


def adapter_params(dim: int, r: int) -> int:
    """Parameters of one adapter: down (dim*r + r) and up (r*dim + dim)."""
    return 2 * dim * r + r + dim


def residual_hook(adapter: BottleneckAdapter):
    def hook(x: Tensor, y: Tensor) -> Tensor:
        return y + adapter(y)  # (B, T, D): the adapter's own skip connection

    return hook


@register_method("adapter")
class Adapter(BlockwiseMethod):
    config_class = AdapterConfig
    identity_at_init = True

    @classmethod
    def attach_block(cls, model, modality: str, layer: int, cfg: AdapterConfig) -> nn.ModuleDict:
        encoder = model.backbone.encoders[modality]
        linears = encoder.linears(layer)
        adapters = nn.ModuleDict()
        for name in PLACEMENTS[cfg.placement]:
            if name not in linears:
                raise ValueError(
                    f"adapter ({cfg.placement}): encoder {modality!r} block {layer} has no linear {name!r}; "
                    f"has {sorted(linears)}"
                )
            dim = linears[name].out_features
            adapters[name] = BottleneckAdapter(dim, cfg.r, cfg.activation, cfg.dropout, cfg.scale)
            model.backbone.hook(modality, layer, name, residual_hook(adapters[name]))
        return adapters
