"""`timm_cnn`: timm convolutional networks (EfficientNet: Tan & Le, "EfficientNet: Rethinking Model
Scaling for Convolutional Neural Networks", ICML 2019, arXiv 1905.11946; ResNet: He et al., "Deep
Residual Learning for Image Recognition", CVPR 2016, arXiv 1512.03385) as feature-grid towers.

``embed`` runs the whole frozen CNN (``forward_features``) and flattens its last feature map
(B, C, H, W) into H*W tokens (B, H*W, C). The tower has ZERO transformer blocks (``num_layers = 0``):
it joins the lockstep schedule only through its final tokens, so fusion methods, heads, linear
probes and late fusion work on it, while methods that act inside blocks (LoRA, adapters, prompts,
PMF) must be restricted to the other modalities; ``block``/``linears``/``norms`` say so.
Pooling is the mean over the grid, which equals timm's average-pool head features.
``flip_average`` averages the grid with the horizontally mirrored image's grid (test-time augmentation).
Preprocessing comes from the model's ``pretrained_cfg`` (e.g. EfficientNet-Lite: mean = std = 0.5).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from ..optional import require
from ..registry import register_encoder
from .base import Encoder, EncoderState
from .timm_vit import (
    TimmOptions,
    build_timm,
    collate_images,
    image_transform,
    load_timm,
    parse_options,
    pixel_values,
    save_timm,
)

TINY_CNN = dict(model_name="test_efficientnet", num_classes=0)


GEM_P = 3.0  # the generalised-mean exponent Radenović et al. fix for retrieval


@register_encoder("timm_cnn")
class TimmCNNEncoder(Encoder):
    """Adapter of a timm CNN with ``forward_features`` -> (B, C, H, W) (wrapped as is in ``self.model``)."""

    num_layers = 0
    pooling = "mean"

    def __init__(self, model: nn.Module, modality: str, options: TimmOptions | None = None):
        super().__init__(model, modality)
        self.options = options or TimmOptions()
        if self.options.pooling == "cls":
            raise ValueError(
                f"encoder {modality!r}: a CNN feature grid has no class token; use pooling 'mean'"
            )
        self.dim = int(model.num_features)
        self.pooling = self.options.pooling or "mean"
        self._transform = None
        model.eval()

    def pool(self, state: EncoderState) -> Tensor:
        """Mean over the grid cells, or with pooling 'gem' their generalised mean (p = 3)."""
        if self.pooling != "gem":
            return super().pool(state)
        x = state.tokens.clamp_min(1e-6).pow(GEM_P)  # (B, H*W, C)
        if state.pad_mask is not None:
            keep = (~state.pad_mask).unsqueeze(-1).to(x.dtype)
            return ((x * keep).sum(1) / keep.sum(1).clamp_min(1.0)).pow(1.0 / GEM_P)
        return x.mean(1).pow(1.0 / GEM_P)  # (B, C)

    @property
    def max_tokens(self) -> int:
        """Grid cells at the input size ``collate`` produces (the model's eval transform)."""
        data = require("timm.data", "timm")
        _, h, w = data.resolve_input_data_config(self.model)["input_size"]
        stride = self.model.feature_info[-1]["reduction"]
        return math.ceil(h / stride) * math.ceil(w / stride)

    @classmethod
    def from_pretrained(cls, path: str, modality: str, **options: Any) -> TimmCNNEncoder:
        opts = parse_options(options, modality)
        encoder = cls(load_timm(path, opts.model_kwargs), modality, opts)
        encoder.source = path
        return encoder

    @classmethod
    def from_config(cls, config: dict, modality: str, **options: Any) -> TimmCNNEncoder:
        """``{"model_name": ..., **create_model kwargs}``, random weights (default: ``TINY_CNN``)."""
        return cls(build_timm(config, TINY_CNN, modality), modality, parse_options(options, modality))

    def save_pretrained(self, path: str) -> None:
        save_timm(self.model, path)

    def embed(self, inputs: Any) -> EncoderState:
        self.check_input(inputs)
        pixels = pixel_values(inputs, self.modality)  # (B, 3, H, W)
        grid = self.model.forward_features(pixels)  # (B, C, h, w)
        if grid.ndim != 4 or grid.shape[1] != self.dim:
            raise ValueError(
                f"encoder {self.modality!r}: forward_features gave {tuple(grid.shape)}, expected (B, {self.dim}, H, W)"
            )
        if self.options.flip_average:  # cell (i, j) of the mirror's grid, flipped back, sees cell (i, j)
            grid = (grid + self.model.forward_features(pixels.flip(-1)).flip(-1)) / 2
        return EncoderState(grid.flatten(2).transpose(1, 2))  # (B, h*w, C)

    def _no_blocks(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"encoder {self.modality!r} ({type(self.model).__name__}) is a CNN feature-grid tower with no "
            f"transformer blocks, so it has no {what}; methods that act inside blocks (lora, adapters, "
            "prompts, pmf ...) cannot use it: restrict them to other modalities with 'modalities'"
        )

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        raise self._no_blocks(f"block {i} to run")

    def block(self, i: int) -> nn.Module:
        raise self._no_blocks(f"block {i}")

    def linears(self, i: int) -> dict[str, nn.Linear]:
        raise self._no_blocks(f"linears in block {i}")

    def norms(self, i: int) -> dict[str, nn.Module]:
        raise self._no_blocks(f"norms in block {i}")

    def reference_forward(self, inputs: Any) -> Tensor:
        """timm's ``forward_features`` grid, flattened to tokens (B, H*W, C)."""
        return self.model.forward_features(pixel_values(inputs, self.modality)).flatten(2).transpose(1, 2)

    def collate(self, items: list[Any]) -> Tensor:
        """PIL images, paths or arrays -> (B, 3, H, W) through timm's eval transform for this model."""
        if self._transform is None:
            self._transform = image_transform(self.model)
        return collate_images(self._transform, items, self.modality)
