"""`hf_vit`: Hugging Face vision transformers (pre-LN): ViT, DeiT, DINOv2 (with registers), BEiT.

- ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
  Scale", ICLR 2021, arXiv 2010.11929.
- DeiT: Touvron et al., "Training data-efficient image transformers & distillation through
  attention", ICML 2021, arXiv 2012.12877 (CLS + distillation token).
- DINOv2: Oquab et al., arXiv 2304.07193 (layer scale); registers: Darcet et al., "Vision
  Transformers Need Registers", ICLR 2024, arXiv 2309.16588.
- BEiT: Bao et al., ICLR 2022, arXiv 2106.08254 (relative position bias, layer scale).

Input: pixel_values (B, C, H, W) or a dict holding them. ``n_prefix`` counts the CLS,
distillation and register tokens. Options: ``pooling`` ("cls", or "mean" over patch tokens),
``interpolate_pos_encoding`` (other image sizes, ViT/DeiT) and ``attn_implementation``.
BEiT's relative position bias is tied to the patch grid, so methods that add tokens are refused
there with a clear error.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..registry import register_encoder
from ._hf_common import (
    HFEncoder,
    attention_bias,
    call_layer,
    collate_images,
    hf_config,
    load_pretrained,
    pixel_input,
    pre_norm_tail,
    transformers_module,
)
from .base import EncoderState, masked_mean, strip_prompts

VISION_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "beit")
POOLINGS = ("cls", "mean")


def prefix_tokens(cfg: Any) -> int:
    """Leading non-patch tokens: CLS, DeiT's distillation token, DINOv2 registers."""
    if cfg.model_type == "deit":
        return 2
    return 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)


@register_encoder("hf_vit")
class HFViTEncoder(HFEncoder):
    """A ViT-style ``transformers`` image model behind the encoder interface."""

    pre_norm = True
    LAYERS = ("layers", "encoder.layer", "encoder.layers")
    LINEARS = {
        "q": ("attention.q_proj", "attention.attention.query"),
        "k": ("attention.k_proj", "attention.attention.key"),
        "v": ("attention.v_proj", "attention.attention.value"),
        "o": ("attention.o_proj", "attention.output.dense"),
        "fc1": ("mlp.fc1", "intermediate.dense"),
        "fc2": ("mlp.fc2", "output.dense"),
    }
    NORMS = {"ln_attn": ("layernorm_before", "norm1"), "ln_ffn": ("layernorm_after", "norm2")}

    def __init__(
        self, model: nn.Module, modality: str, pooling: str = "cls", interpolate_pos_encoding: bool = False
    ):
        super().__init__(model, modality)
        cfg = model.config
        if cfg.model_type not in VISION_TYPES:
            raise ValueError(
                f"encoder {modality!r} (hf_vit): model_type {cfg.model_type!r} is not supported; "
                f"supported: {', '.join(VISION_TYPES)}"
            )
        if pooling not in POOLINGS:
            raise ValueError(f"encoder {modality!r} (hf_vit): pooling {pooling!r} is not one of {POOLINGS}")
        self.dim, self.num_layers, self.pooling = cfg.hidden_size, cfg.num_hidden_layers, pooling
        self.n_prefix = prefix_tokens(cfg)
        self.interpolate = interpolate_pos_encoding
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        self.input_shape = (cfg.num_channels, size, size)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        modality: str,
        pooling: str = "cls",
        interpolate_pos_encoding: bool = False,
        attn_implementation: str | None = None,
    ) -> HFViTEncoder:
        """A local directory (offline) or a hub name; the HF class follows the saved model_type."""
        tf = transformers_module()
        what = f"encoder {modality!r} (hf_vit)"
        model = load_pretrained(tf.AutoModel, path, attn_implementation, what, ignore=("pooler.",))
        encoder = cls(model.eval(), modality, pooling, interpolate_pos_encoding)
        encoder.source = path
        return encoder

    @classmethod
    def from_config(
        cls,
        config: dict,
        modality: str,
        pooling: str = "cls",
        interpolate_pos_encoding: bool = False,
        attn_implementation: str | None = None,
    ) -> HFViTEncoder:
        """Random weights from a HF config dict (``model_type`` defaults to "vit")."""
        tf = transformers_module()
        cfg = hf_config(config, "vit", f"encoders.{modality}.config")
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return cls(
            tf.AutoModel.from_config(cfg, **kwargs).eval(), modality, pooling, interpolate_pos_encoding
        )

    @property
    def is_beit(self) -> bool:
        return self.model.config.model_type == "beit"

    def has_flag(self, *model_types: str) -> bool:
        """Whether this model takes ``interpolate_pos_encoding`` (DINOv2 and BEiT embeddings always do)."""
        return self.model.config.model_type in model_types

    # --- the encoder interface ----------------------------------------------------------------
    def embed(self, inputs: Any) -> EncoderState:
        self.check_input(inputs)
        pixels = pixel_input(inputs, self.modality)
        pixels = pixels.to(self.model.embeddings.patch_embeddings.projection.weight.dtype)
        kwargs = (
            {"interpolate_pos_encoding": True} if self.interpolate and self.has_flag("deit", "vit") else {}
        )
        x = self.model.embeddings(pixels, **kwargs)  # (B, n_prefix + patches, D)
        extras = {"resolution": tuple(pixels.shape[2:]), "embedded_len": x.shape[1]}
        return EncoderState(x, None, n_prefix=self.n_prefix, extras=extras)

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        x = state.tokens  # (B, T, D); T grows when methods add tokens
        bias = attention_bias(state.pad_mask, x.shape[1], x.shape[1], x.dtype, x.device)
        if not self.is_beit:
            return state.replace(tokens=call_layer(self.block(i), x, bias))
        bias = self.beit_bias(state, bias)
        kwargs = {"resolution": state.extras["resolution"], "interpolate_pos_encoding": self.interpolate}
        return state.replace(tokens=call_layer(self.block(i), x, bias, **kwargs))

    def beit_bias(self, state: EncoderState, bias: Tensor | None) -> Tensor | None:
        """Add BEiT's shared relative position bias; refuse sequences off the patch grid."""
        cfg, T = self.model.config, state.tokens.shape[1]
        if (cfg.use_relative_position_bias or cfg.use_shared_relative_position_bias) and (
            T != state.extras["embedded_len"]
        ):
            raise ValueError(
                f"encoder {self.modality!r}: BEiT's relative position bias covers exactly the patch grid "
                f"({state.extras['embedded_len']} tokens); methods that add tokens ({T}) are not supported on it"
            )
        shared = getattr(self.model, "shared_position_bias", None)
        if shared is None:
            return bias
        h, w = state.extras["resolution"]
        window = (h // cfg.patch_size, w // cfg.patch_size)
        rel = shared(window, interpolate_pos_encoding=self.interpolate, dim_size=T)  # (1, heads, T, T)
        rel = rel if rel.ndim == 4 else rel[None]
        return rel if bias is None else rel + bias

    def run_block_tail(self, i: int, state: EncoderState, n: int) -> Tensor:
        """Queries and FFN of the last n rows only (eval mode, ViT/DeiT/DINOv2 with an MLP FFN)."""
        layer, lin = self.block(i), self.linears(i)
        if self.training or self.is_beit or "fc1" not in lin:
            return super().run_block_tail(i, state, n)
        scales = (
            getattr(layer, "layer_scale1", nn.Identity()),
            getattr(layer, "layer_scale2", nn.Identity()),
        )
        heads = self.model.config.num_attention_heads
        return pre_norm_tail(self, i, state, n, heads, layer.mlp.activation_fn, scales=scales)

    def finalize(self, state: EncoderState) -> EncoderState:
        return state.replace(tokens=self.model.layernorm(state.tokens))

    def pool(self, state: EncoderState) -> Tensor:
        """CLS token, or the mean of patch tokens (BEiT mean pooling adds its pooler LayerNorm)."""
        if self.pooling == "cls":
            return state.tokens[:, 0]
        tokens, pad = strip_prompts(state)
        pad = None if pad is None else pad[:, state.n_prefix :]
        pooled = masked_mean(tokens[:, state.n_prefix :], pad)  # (B, D)
        norm = getattr(getattr(self.model, "pooler", None), "layernorm", None)
        return norm(pooled) if isinstance(norm, nn.Module) else pooled

    def reference_forward(self, inputs: Any) -> Tensor:
        pixels = pixel_input(inputs, self.modality)
        flag = self.interpolate and self.has_flag("deit", "vit", "beit")
        kwargs = {"interpolate_pos_encoding": True} if flag else {}
        return self.model(pixel_values=pixels, **kwargs).last_hidden_state

    def collate(self, items: list[Any]) -> Tensor:
        """PIL images / image files (through the checkpoint's image processor) or arrays (C, H, W)."""
        C, H, W = self.input_shape
        return collate_images(self, items, (C, None, None) if self.interpolate else (C, H, W))
