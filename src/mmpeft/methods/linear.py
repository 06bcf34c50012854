"""`linear`: linear probe — frozen encoders, one linear layer on the concatenated pooled features."""

from __future__ import annotations

from ..registry import register_method
from .base import Method


@register_method("linear")
class LinearProbe(Method):
    """Trains only the model's default head (a single linear layer unless ``head.hidden`` is set)."""

    identity_at_init = True

    @classmethod
    def attach(cls, model, cfg):
        return None  # the default head is all that trains
