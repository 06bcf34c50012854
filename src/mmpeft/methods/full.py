"""`full`: full fine-tuning — every encoder weight trains, with the default head."""

from __future__ import annotations

from ..registry import register_method
from .base import Method


@register_method("full")
class FullFineTuning(Method):
    """Unfreezes the chosen encoders (``modalities``; all by default). Checkpoints then hold their weights."""

    identity_at_init = True
    trains_base_weights = True

    @classmethod
    def attach(cls, model, cfg):
        for m in cls.modalities(model, cfg):
            encoder = model.backbone.encoders[m]
            for p in encoder.parameters():
                p.requires_grad_(True)
        return None
