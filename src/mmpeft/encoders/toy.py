"""`toy`: tiny random feature transformers of any width and depth, for tests and smoke runs.

Same architecture as the ``features`` encoder; give different ``dim``/``depth`` per modality to
expose dimension and alignment bugs on CPU in milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict

from ..config import from_dict
from ..registry import register_encoder
from .features import FeatureEncoder, FeatureTransformer, FeatureTransformerConfig

TOY_DEFAULTS = asdict(FeatureTransformerConfig(input_dim=8, dim=32, depth=2, heads=4, max_len=16))


@register_encoder("toy")
class ToyEncoder(FeatureEncoder):
    """A ``features`` encoder built from a tiny random config (no weights to load)."""

    @classmethod
    def from_config(cls, config: dict, modality: str) -> ToyEncoder:
        merged = {**TOY_DEFAULTS, **(config or {})}
        cfg = from_dict(FeatureTransformerConfig, merged, where=f"encoders.{modality}.config")
        return cls(FeatureTransformer(cfg), modality)
