"""`timm_vit`: timm ``VisionTransformer`` models (Dosovitskiy et al., "An Image is Worth 16x16 Words:
Transformers for Image Recognition at Scale", ICLR 2021, arXiv 2010.11929; register tokens: Darcet
et al., "Vision Transformers Need Registers", ICLR 2024, arXiv 2309.16588).

``embed`` = patch embedding, class + register tokens (``n_prefix``), positions, ``norm_pre``; blocks
are ``model.blocks[i]`` with a fused ``qkv`` projection (``linears`` returns "qkv", and LoRA's q/v
targets update their slice of it); ``finalize`` = ``model.norm``. Pooling is timm's own head
pooling (``forward_head(pre_logits=True)``: class token or average, then ``fc_norm``) unless
option ``pooling`` overrides it. Input: images (B, 3, H, W) or a dict with ``pixel_values``.

The helpers below (loading, saving, image preprocessing) are shared with ``timm_cnn``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError, from_dict
from ..optional import require
from ..registry import register_encoder
from .base import Encoder, EncoderState, additive_attention_mask, strip_prompts

TINY_VIT = dict(
    model_name="vit_tiny_patch16_224",
    img_size=32,
    patch_size=8,
    depth=2,
    embed_dim=32,
    num_heads=2,
    num_classes=0,
)


@dataclass
class TimmOptions:
    pooling: str | None = None
    """None: the model's own pooling; "cls" or "mean" overrides it; "gem" (CNN grids only):
    generalised mean, (mean of max(x, 0)^3)^(1/3) per channel (Radenović et al., TPAMI 2019,
    arXiv 1711.02512)."""
    model_kwargs: dict = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments for ``from_pretrained`` (e.g. ``img_size``)."""
    flip_average: bool = False
    """CNN grids only: the grid is the mean of the image's grid and its mirror image's grid (flipped
    back), the horizontal-flip test-time augmentation of image retrieval (e.g. Radenović et al.,
    above); a frozen, deterministic feature, so the prefix cache holds it like any other."""


def parse_options(options: dict, modality: str) -> TimmOptions:
    opts = from_dict(TimmOptions, options, where=f"encoders.{modality}.options")
    if opts.pooling not in (None, "cls", "mean", "gem"):
        raise ConfigError(
            f"encoders.{modality}.options.pooling: {opts.pooling!r} is not one of None, 'cls', 'mean', 'gem'"
        )
    return opts


def load_timm(path: str, model_kwargs: dict) -> nn.Module:
    """A local directory (timm's config.json + weights), ``local-dir:``/``hf-hub:`` name or timm name."""
    timm = require("timm", "timm")
    name = path
    if os.path.isdir(path):
        name = "local-dir:" + os.path.abspath(path)
    elif os.path.exists(path):
        raise ValueError(
            f"timm encoder: {path!r} is a file; give the directory holding config.json and weights"
        )
    return timm.create_model(name, pretrained=True, **model_kwargs)


def build_timm(config: dict | None, tiny: dict, modality: str) -> nn.Module:
    """``{"model_name": ..., **create_model kwargs}`` with random weights; no model_name -> ``tiny``."""
    timm = require("timm", "timm")
    kwargs = dict(config or {})
    if "model_name" not in kwargs:
        kwargs = {**tiny, **kwargs}
    name = kwargs.pop("model_name")
    kwargs.pop("pretrained", None)
    if not timm.is_model(name):
        raise ConfigError(f"encoders.{modality}.config.model_name: unknown timm model {name!r}")
    return timm.create_model(name, pretrained=False, **kwargs)


def save_timm(model: nn.Module, path: str) -> None:
    """Save in timm's hub layout (config.json with model_args + model.safetensors); loads offline."""
    require("timm", "timm")
    from timm.models import save_for_hf

    save_for_hf(model, path, safe_serialization=True)


def image_transform(model: nn.Module) -> Any:
    """timm's eval transform for the model's current input size and its pretrained mean/std."""
    data = require("timm.data", "timm")
    try:
        cfg = data.resolve_input_data_config(model)
    except Exception:  # older timm: the pretrained config alone
        cfg = data.resolve_data_config({}, model=model)
    return data.create_transform(**cfg, is_training=False)


def to_image(item: Any) -> Any:
    """A path, PIL image or array -> PIL RGB image, or a (3, H, W) float tensor in [0, 1]."""
    image_mod = require("PIL.Image", "train")
    if isinstance(item, (str, os.PathLike)):
        with image_mod.open(item) as im:
            return im.convert("RGB")
    if isinstance(item, image_mod.Image):
        return item.convert("RGB")
    a = torch.as_tensor(np.asarray(item.detach().cpu() if isinstance(item, Tensor) else item))
    if a.ndim == 2:
        a = a[None].expand(3, -1, -1)  # grey -> RGB
    if a.ndim != 3 or (a.shape[0] not in (1, 3) and a.shape[-1] not in (1, 3)):
        raise ValueError(f"expected an image array (H, W), (H, W, C) or (C, H, W), got {tuple(a.shape)}")
    if a.shape[0] not in (1, 3):
        a = a.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    a = a.expand(3, -1, -1) if a.shape[0] == 1 else a
    a = a.float() / 255.0 if a.dtype == torch.uint8 else a.float()
    if not torch.isfinite(a).all():
        raise ValueError("image array contains NaN or Inf")
    return a.contiguous()


def collate_images(transform: Any, items: list[Any], modality: str) -> Tensor:
    out = []
    for j, item in enumerate(items):
        try:
            out.append(transform(to_image(item)))
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"encoder {modality!r}: item {j} is not a usable image: {e}") from None
    return torch.stack(out)  # (B, 3, H, W)


def pixel_values(inputs: Any, modality: str) -> Tensor:
    x = inputs["pixel_values"] if isinstance(inputs, dict) and "pixel_values" in inputs else inputs
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"encoder {modality!r}: expected images (B, C, H, W) or {{'pixel_values': ...}}, got {got}"
        )
    return x


@register_encoder("timm_vit")
class TimmViTEncoder(Encoder):
    """Adapter of ``timm.models.VisionTransformer`` (wrapped as is in ``self.model``)."""

    def __init__(self, model: nn.Module, modality: str, options: TimmOptions | None = None):
        super().__init__(model, modality)
        vit = require("timm.models.vision_transformer", "timm")
        if not isinstance(model, vit.VisionTransformer):
            raise ValueError(
                f"encoder {modality!r}: timm_vit wraps VisionTransformer, got {type(model).__name__}"
            )
        attn = model.blocks[0].attn if len(model.blocks) else None
        if attn is not None and not (hasattr(attn, "qkv") and hasattr(attn, "proj")):
            raise ValueError(
                f"encoder {modality!r}: timm block {type(model.blocks[0]).__name__} has no fused qkv"
            )
        self.options = options or TimmOptions()
        self.dim = model.embed_dim
        self.num_layers = len(model.blocks)
        self.pre_norm = not any(isinstance(b, vit.ResPostBlock) for b in model.blocks)
        own = "cls" if model.global_pool == "token" else "mean"
        if self.options.pooling == "gem":
            raise ValueError(f"encoder {modality!r}: pooling 'gem' is for CNN feature grids (timm_cnn)")
        if self.options.flip_average:
            raise ValueError(f"encoder {modality!r}: flip_average is for CNN feature grids (timm_cnn)")
        self.pooling = self.options.pooling or own
        self._transform = None
        model.eval()

    @property
    def max_tokens(self) -> int:
        return self.model.patch_embed.num_patches + self.model.num_prefix_tokens

    @classmethod
    def from_pretrained(cls, path: str, modality: str, **options: Any) -> TimmViTEncoder:
        opts = parse_options(options, modality)
        encoder = cls(load_timm(path, opts.model_kwargs), modality, opts)
        encoder.source = path
        return encoder

    @classmethod
    def from_config(cls, config: dict, modality: str, **options: Any) -> TimmViTEncoder:
        return cls(build_timm(config, TINY_VIT, modality), modality, parse_options(options, modality))

    def save_pretrained(self, path: str) -> None:
        save_timm(self.model, path)

    def embed(self, inputs: Any) -> EncoderState:
        self.check_input(inputs)
        m = self.model
        x = m.patch_embed(pixel_values(inputs, self.modality))  # (B, N, D) or (B, H, W, D)
        x = m.norm_pre(m.patch_drop(m._pos_embed(x)))  # (B, P + N, D), P = cls + register tokens
        return EncoderState(x, n_prefix=m.num_prefix_tokens)

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        bias = additive_attention_mask(state.pad_mask, state.tokens.dtype)  # (B, 1, 1, T) or None
        return state.replace(tokens=self.model.blocks[i](state.tokens, attn_mask=bias))

    def finalize(self, state: EncoderState) -> EncoderState:
        return state.replace(tokens=self.model.norm(state.tokens))

    def block(self, i: int) -> nn.Module:
        return self.model.blocks[i]

    def linears(self, i: int) -> dict[str, nn.Linear]:
        b = self.model.blocks[i]
        found = {"qkv": b.attn.qkv, "o": b.attn.proj}
        found.update(
            {k: getattr(b.mlp, k) for k in ("fc1", "fc2") if isinstance(getattr(b.mlp, k, None), nn.Linear)}
        )
        return found

    def norms(self, i: int) -> dict[str, nn.Module]:
        b = self.model.blocks[i]
        return {"ln_attn": b.norm1, "ln_ffn": b.norm2}

    def pool(self, state: EncoderState) -> Tensor:
        """timm's own ``forward_head(pre_logits=True)`` on the prompt-free tokens: (B, T, D) -> (B, D)."""
        tokens, pad = strip_prompts(state)
        own = self.options.pooling is None and self.model.global_pool
        if own and (pad is None or not bool(pad.any())):
            return self.model.forward_head(tokens, pre_logits=True)
        return super().pool(state)

    def reference_forward(self, inputs: Any) -> Tensor:
        return self.model.forward_features(pixel_values(inputs, self.modality))

    def collate(self, items: list[Any]) -> Tensor:
        """PIL images, paths or arrays -> (B, 3, H, W) through timm's eval transform for this model."""
        if self._transform is None:
            self._transform = image_transform(self.model)
        return collate_images(self._transform, items, self.modality)
