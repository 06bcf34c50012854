"""Task heads: pooled or fused features -> outputs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class HeadConfig:
    num_outputs: int = 2
    """Outputs of the head (classes, regression targets, answers); 0 means no head (features out)."""
    hidden: int = 0
    """Hidden width of an MLP head; 0 gives a single linear layer."""
    dropout: float = 0.0
    """Dropout on the head's input."""


class MLPHead(nn.Module):
    """Dropout -> Linear, or Dropout -> Linear -> GELU -> Linear when ``hidden`` > 0."""

    def __init__(self, in_dim: int, num_outputs: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden > 0:
            layers += [nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_outputs)]
        else:
            layers.append(nn.Linear(in_dim, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)
