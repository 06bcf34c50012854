"""`temporal_transformer`: a small trainable transformer over the frame features of each clip.

A ``video`` tower pools each frame as its image tower does and averages the N frame features, so
its clip feature cannot depend on the frames' order: a digit moving up and one moving down give
the same mean. This method puts a residual transformer over the N frame features, with learned
temporal position embeddings, between the per-frame pooling and that mean, as CLIP4Clip's
"sequential transformer" does (Luo et al., Neurocomputing 2022, arXiv 2104.08860, §3.3):

    x = frame features (B, N, D);  h = LN(x) + pos;  h = blocks(h);  clip = mean_n(x + W_o · LN(h))

``W_o`` starts at zero, so at initialisation the model is the frozen model (and a probe fitted for
``train.head_init`` stays valid). Nothing inside the towers' blocks changes: with no block method
beside it the frozen towers' final states are cached whole (``train.prefix_cache``), and it
combines with any block method (``model.methods: [{name: temporal_transformer}, {name: uniadapter}]``).
It acts wherever the clip feature is the video tower's pooling (linear, probe, late fusion, the
retrieval and VQA heads); BLIP's retrieval head pools the frames itself (frame-aware attention is
its temporal model), so the two are refused together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..encoders.video import BLIP_POOLS_FRAMES, video_towers
from ..registry import register_method
from .base import Method, MethodConfig


@dataclass
class TemporalTransformerConfig(MethodConfig):
    depth: int = 1
    """Transformer blocks over the frame features (CLIP4Clip uses 4 at width 512)."""
    width: int | None = None
    """Width of the temporal blocks (None: the video tower's width; else projected in and out)."""
    heads: int = 4
    """Attention heads (must divide ``width``)."""
    mlp_ratio: float = 2.0
    """Hidden width of each block's MLP over its width."""
    dropout: float = 0.1
    """Dropout inside the temporal blocks (training only)."""


class FrameMixer(nn.Module):
    """(B, N, D) frame features -> (B, N, D): x + W_o · LN(blocks(LN(W_i x) + pos)), W_o zero at init."""

    def __init__(
        self, frames: int, dim: int, width: int, layers: int, heads: int, mlp_ratio: float, dropout: float
    ):
        super().__init__()
        self.inp = nn.Identity() if width == dim else nn.Linear(dim, width)
        self.norm_in = nn.LayerNorm(width)
        # unit scale, as the normalised features: with small position vectors (ViT's 0.02) the
        # blocks learn the order far more slowly (digit-video val, direction questions)
        self.position = nn.Parameter(torch.randn(frames, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                heads,
                int(width * mlp_ratio),
                dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, frames: Tensor) -> Tensor:
        h = self.norm_in(self.inp(frames)) + self.position.to(frames.dtype)
        for block in self.blocks:
            h = block(h)
        return frames + self.out(self.norm(h))


@register_method("temporal_transformer")
class TemporalTransformer(Method):
    config_class = TemporalTransformerConfig
    needs_video_tower = True
    identity_at_init = True
    missing = (
        "an absent clip's frame features are model.missing's, mixed like any other; fusions that "
        "drop absent modalities drop its clip feature too"
    )

    @classmethod
    def attach(cls, model, cfg: TemporalTransformerConfig):
        if cfg.layers is not None:
            raise ConfigError(
                "temporal_transformer: acts after the towers' blocks; set 'depth', not 'layers'"
            )
        encoders = model.backbone.encoders
        mods = video_towers(cls.name, encoders, cls.modalities(model, cfg), "whose frames it could mix")
        if getattr(model.peft["head"] if "head" in model.peft else None, "pools_frames", False):
            raise ConfigError(f"temporal_transformer: {BLIP_POOLS_FRAMES}")
        container = nn.ModuleDict()
        for m in mods:
            encoder = encoders[m]
            width = cfg.width or encoder.dim
            if cfg.depth < 1 or width % cfg.heads:
                raise ConfigError(
                    f"temporal_transformer: needs depth >= 1 and heads dividing width {width}, "
                    f"got depth {cfg.depth}, heads {cfg.heads}"
                )
            mixer = FrameMixer(
                encoder.frames, encoder.dim, width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout
            )
            encoder.set_frame_mixer(mixer)
            container[m] = mixer
        return container
