"""`temporal`: learned temporal position embeddings for video towers.

A ``video`` tower runs the N frames of a clip through an image tower as independent images, and
its pooling averages the frame features, so on its own nothing knows the order of the frames
(a digit moving up and one moving down give the same mean). This method adds a learned vector
per frame index to every token of that frame before block ``layer`` (default 0) of each video
tower; the blocks after it mix content and position, so the pooled clip feature can depend on
the order (as the temporal embeddings of video transformers do; e.g. TimeSformer, Bertasius et
al., ICML 2021, arXiv 2102.05095). The embeddings start at zero: the model is the frozen model at
initialisation. Combine it with any other method (``model.methods: [{name: temporal},
{name: uniadapter}]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..encoders.base import EncoderState
from ..encoders.video import rows_per_example, video_towers
from ..registry import register_method
from .base import Method, MethodConfig


@dataclass
class TemporalConfig(MethodConfig):
    layer: int = 0
    """Block of each video tower before which the frame embeddings are added (negative from the end)."""


class FrameEmbeddings(nn.Module):
    """(N, D) learned vectors, frame k's added to every token of frame k."""

    def __init__(self, frames: int, dim: int):
        super().__init__()
        self.frames = frames
        self.embedding = nn.Parameter(torch.zeros(frames, dim))

    def forward(self, state: EncoderState) -> EncoderState:
        x = state.tokens  # (B·N, T, D), frames of one clip consecutive
        per_clip = self.embedding.to(x.dtype).repeat(x.shape[0] // self.frames, 1)  # (B·N, D)
        return state.replace(tokens=x + per_clip.unsqueeze(1))


@register_method("temporal")
class TemporalEmbedding(Method):
    config_class = TemporalConfig
    needs_video_tower = True
    identity_at_init = True
    acts_in_blocks = True
    missing = "adds nothing an absent clip could not carry (its tokens are model.missing's)"

    @classmethod
    def attach(cls, model, cfg: TemporalConfig):
        encoders = model.backbone.encoders
        mods = video_towers(cls.name, encoders, cls.modalities(model, cfg), "to add frame embeddings to")
        container = nn.ModuleDict()
        for m in mods:
            [i] = model.backbone.resolve_layers(m, [cfg.layer])
            frames = FrameEmbeddings(rows_per_example(encoders[m]), encoders[m].dim)
            model.backbone.add_block_module(m, i, frames, where="before")
            container[m] = frames
        return container
