"""`hf_clip_text` / `hf_clip_vision`: the towers of Hugging Face CLIP and SigLIP (pre-LN).

- CLIP: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
  ICML 2021, arXiv 2103.00020. The text tower is causal and pools the EOS token; the vision
  tower has ``pre_layrnorm`` before the blocks and ``post_layernorm`` (applied by ``finalize`` to
  every token, so the pooled CLS equals the library's ``pooler_output``).
- SigLIP: Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023, arXiv
  2303.15343. Bidirectional text tower pooling the last position; the vision tower has no CLS
  and pools with its attention head (``pooling="map"``) or a mean.

Loading a joint checkpoint (``CLIPModel`` / ``SiglipModel``) gives the chosen tower; its
state-dict keys are those of the tower class (``CLIPTextModel`` ...), as transformers loads them.
Inputs: text — {"input_ids", "attention_mask"?}; vision — pixel_values (B, C, H, W) or a dict.
Options: ``pooling``, ``max_length`` (text), ``interpolate_pos_encoding`` (vision), ``attn_implementation``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import register_encoder
from ._hf_common import (
    HFEncoder,
    attention_bias,
    call_layer,
    collate_images,
    collate_text,
    hf_config,
    load_pretrained,
    pad_mask_of,
    pixel_input,
    pre_norm_tail,
    split_text_input,
    transformers_module,
)
from .base import EncoderState, strip_prompts

# model_type (tower or joint) -> (tower class in transformers, family)
TEXT_TOWERS = {
    "clip": ("CLIPTextModel", "clip"),
    "clip_text_model": ("CLIPTextModel", "clip"),
    "siglip": ("SiglipTextModel", "siglip"),
    "siglip_text_model": ("SiglipTextModel", "siglip"),
}
VISION_TOWERS = {
    "clip": ("CLIPVisionModel", "clip"),
    "clip_vision_model": ("CLIPVisionModel", "clip"),
    "siglip": ("SiglipVisionModel", "siglip"),
    "siglip_vision_model": ("SiglipVisionModel", "siglip"),
}


class CLIPTower(HFEncoder):
    """What both towers share: layer layout, loading, the pre-LN block and its tail."""

    pre_norm = True
    TOWERS: dict[str, tuple[str, str]] = {}
    SUB_CONFIG = ""  # text_config / vision_config of a joint config
    DEFAULT_TYPE = ""
    POOLINGS: tuple[str, ...] = ()
    LAYERS = ("encoder.layers", "encoder.layer")
    LINEARS = {
        "q": ("self_attn.q_proj",),
        "k": ("self_attn.k_proj",),
        "v": ("self_attn.v_proj",),
        "o": ("self_attn.out_proj", "self_attn.o_proj"),
        "fc1": ("mlp.fc1",),
        "fc2": ("mlp.fc2",),
    }
    NORMS = {"ln_attn": ("layer_norm1",), "ln_ffn": ("layer_norm2",)}
    causal = False

    def __init__(self, model: nn.Module, modality: str, family: str, pooling: str | None, **options: Any):
        super().__init__(model, modality)
        self.family = family
        cfg = model.config
        self.dim, self.num_layers = cfg.hidden_size, cfg.num_hidden_layers
        self.pooling = pooling or self.default_pooling()
        if self.pooling not in self.POOLINGS:
            raise ValueError(
                f"encoder {modality!r} ({self.name}): pooling {self.pooling!r} is not one of {self.POOLINGS}"
            )
        self.setup(**options)

    def default_pooling(self) -> str:
        raise NotImplementedError

    def setup(self, **options: Any) -> None:
        raise NotImplementedError

    @classmethod
    def tower(cls, model_type: str, modality: str) -> tuple[str, str]:
        if model_type not in cls.TOWERS:
            raise ValueError(
                f"encoder {modality!r} ({cls.name}): model_type {model_type!r} is not supported; "
                f"supported: {', '.join(cls.TOWERS)}"
            )
        return cls.TOWERS[model_type]

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        modality: str,
        pooling: str | None = None,
        attn_implementation: str | None = None,
        **options,
    ) -> CLIPTower:
        """A tower or joint checkpoint: local directory (offline) or hub name."""
        tf = transformers_module()
        class_name, family = cls.tower(tf.AutoConfig.from_pretrained(path).model_type, modality)
        what = f"encoder {modality!r} ({cls.name})"
        model = load_pretrained(getattr(tf, class_name), path, attn_implementation, what)
        encoder = cls(model.eval(), modality, family, pooling, **options)
        encoder.source = path
        return encoder

    @classmethod
    def from_config(
        cls,
        config: dict,
        modality: str,
        pooling: str | None = None,
        attn_implementation: str | None = None,
        **options,
    ) -> CLIPTower:
        """Random weights from a HF tower config dict, or a joint one (its tower is built)."""
        tf = transformers_module()
        cfg = hf_config(config, cls.DEFAULT_TYPE, f"encoders.{modality}.config")
        class_name, family = cls.tower(cfg.model_type, modality)
        model = getattr(tf, class_name)(getattr(cfg, cls.SUB_CONFIG, cfg))  # a joint config holds the tower's
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        return cls(model.eval(), modality, family, pooling, **options)

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        x = state.tokens  # (B, T, D); T may exceed the embedded length when methods add tokens
        bias = attention_bias(state.pad_mask, x.shape[1], x.shape[1], x.dtype, x.device, self.causal)
        return state.replace(tokens=call_layer(self.block(i), x, bias))

    def run_block_tail(self, i: int, state: EncoderState, n: int) -> Tensor:
        """Queries and FFN of the last n rows only (eval mode; training runs the whole block)."""
        if self.training:
            return super().run_block_tail(i, state, n)
        act = self.block(i).mlp.activation_fn
        heads = self.model.config.num_attention_heads
        return pre_norm_tail(self, i, state, n, heads, act, causal=self.causal)


@register_encoder("hf_clip_text")
class HFCLIPTextEncoder(CLIPTower):
    """CLIP (causal, EOS pooling) or SigLIP (bidirectional, last-position pooling) text tower."""

    TOWERS = TEXT_TOWERS
    SUB_CONFIG = "text_config"
    DEFAULT_TYPE = "clip_text_model"
    POOLINGS = ("eos", "mean")

    def default_pooling(self) -> str:
        return "eos"

    def setup(self, max_length: int | None = None) -> None:
        cfg = self.model.config
        self.causal = self.family == "clip"
        self.max_length = min(max_length or cfg.max_position_embeddings, cfg.max_position_embeddings)

    def eos_index(self, ids: Tensor) -> Tensor:
        """(B, T) ids -> (B,) position pooled by the library (CLIP: EOS token; SigLIP: last)."""
        B, T = ids.shape
        if self.family == "siglip":
            return torch.full((B,), T - 1, dtype=torch.long, device=ids.device)
        eos = self.model.config.eos_token_id
        if eos == 2:  # configs before the EOS fix: the EOS token has the highest id
            return ids.argmax(dim=-1)
        return (ids == eos).int().argmax(dim=-1)  # first EOS

    def embed(self, inputs: Any) -> EncoderState:
        self.check_input(inputs)
        ids, mask, _ = split_text_input(inputs, self.modality)
        if ids.ndim != 2:
            raise ValueError(f"encoder {self.modality!r}: input_ids must be (B, T), got {tuple(ids.shape)}")
        x = self.model.embeddings(input_ids=ids)  # (B, T, D)
        n_prefix = 1 if self.family == "clip" else 0  # CLIP's start-of-text token
        return EncoderState(
            x, pad_mask_of(mask), n_prefix=n_prefix, extras={"eos_index": self.eos_index(ids)}
        )

    def finalize(self, state: EncoderState) -> EncoderState:
        return state.replace(tokens=self.model.final_layer_norm(state.tokens))

    def pool(self, state: EncoderState) -> Tensor:
        """The EOS (CLIP) / last (SigLIP) token, shifted past prompts inserted after the prefix."""
        if self.pooling == "mean":
            return super().pool(state)
        index = state.extras["eos_index"] + state.n_prompt  # (B,)
        return state.tokens[torch.arange(state.tokens.shape[0], device=index.device), index]

    def reference_forward(self, inputs: Any) -> Tensor:
        ids, mask, _ = split_text_input(inputs, self.modality)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def collate(self, items: list[Any]) -> dict[str, Tensor]:
        """Strings via the checkpoint's tokenizer, or token-id lists for a model built from a config."""
        cfg = self.model.config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        return collate_text(self, items, self.max_length, pad, cfg.vocab_size)


@register_encoder("hf_clip_vision")
class HFCLIPVisionEncoder(CLIPTower):
    """CLIP vision tower (CLS, pre/post LayerNorm) or SigLIP's (no CLS, attention-pool head)."""

    TOWERS = VISION_TOWERS
    SUB_CONFIG = "vision_config"
    DEFAULT_TYPE = "clip_vision_model"
    POOLINGS = ("cls", "mean", "map")

    def default_pooling(self) -> str:
        if self.family == "clip":
            return "cls"
        return "map" if getattr(self.model, "head", None) is not None else "mean"

    def setup(self, interpolate_pos_encoding: bool = False) -> None:
        cfg = self.model.config
        self.interpolate = interpolate_pos_encoding
        self.input_shape = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if self.pooling == "cls" and self.family != "clip":
            raise ValueError(
                f"encoder {self.modality!r}: SigLIP has no CLS token; use pooling 'map' or 'mean'"
            )
        if self.pooling == "map" and getattr(self.model, "head", None) is None:
            raise ValueError(f"encoder {self.modality!r}: this vision tower has no attention-pool head")

    def embed(self, inputs: Any) -> EncoderState:
        self.check_input(inputs)
        pixels = pixel_input(inputs, self.modality)
        x = self.model.embeddings(pixels, interpolate_pos_encoding=self.interpolate)  # (B, T, D)
        if self.family == "clip":
            x = self.model.pre_layrnorm(x)
        return EncoderState(x, None, n_prefix=1 if self.family == "clip" else 0)

    def finalize(self, state: EncoderState) -> EncoderState:
        return state.replace(tokens=self.model.post_layernorm(state.tokens))

    def pool(self, state: EncoderState) -> Tensor:
        if self.pooling == "map":
            tokens, _ = strip_prompts(state)
            return self.model.head(tokens)  # (B, D)
        return super().pool(state)

    def reference_forward(self, inputs: Any) -> Tensor:
        """The library's last hidden state, with CLIP's post-LayerNorm applied to every token."""
        pixels = pixel_input(inputs, self.modality)
        out = self.model(pixel_values=pixels, interpolate_pos_encoding=self.interpolate).last_hidden_state
        return self.model.post_layernorm(out) if self.family == "clip" else out

    def collate(self, items: list[Any]) -> Tensor:
        """PIL images / image files (through the checkpoint's image processor) or arrays (C, H, W)."""
        C, H, W = self.input_shape
        return collate_images(self, items, (C, None, None) if self.interpolate else (C, H, W))
