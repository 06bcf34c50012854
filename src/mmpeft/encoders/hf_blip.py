"""`hf_blip`: the two towers of a Hugging Face ``BlipForImageTextRetrieval`` (BLIP ITM/ITC model).

Li et al., "BLIP: Bootstrapping Language-Image Pre-training", ICML 2022, arXiv 2201.12086; the
faithful backbone of UniAdapter (arXiv 2302.06605). Each modality is one tower of ONE loaded
model: ``options: {tower: vision}`` wraps ``vision_model`` (pre-LN ViT, final ``post_layernorm``),
``options: {tower: text}`` wraps ``text_encoder`` (post-LN BERT whose layers run self-attention ->
cross-attention -> FFN; cross-attention runs only when the state carries image tokens in
``extras["encoder_hidden_states"]``, the ITM mode). The two towers built from the same path (or
config) share one model, so the text tower's cross-attention and the retrieval heads
(``vision_proj``, ``text_proj``, ``itm_head``, reachable as ``encoder.blip``) match the vision tower.

Inputs: vision ``pixel_values`` (B, 3, H, W) or ``{"pixel_values": ...}``; text ``{"input_ids",
"attention_mask"}``. ``norms(i)`` adds ``ln_cross`` (the LayerNorm after cross-attention) to the
canonical ``ln_attn``/``ln_ffn`` of the text tower.
"""

from __future__ import annotations

import json
import os
import weakref
from typing import Any

from torch import Tensor, nn

from ..optional import require
from ..registry import register_encoder
from .base import Encoder, EncoderState, additive_attention_mask

TOWER_BY_NAME = {"image": "vision", "vision": "vision", "video": "vision", "text": "text", "caption": "text"}

# key -> (model, towers already handed out): the second tower of a pair reuses the first's model;
# a tower asked for twice means a new model (a second build of the same config).
_PAIRS: dict[str, tuple[weakref.ref, set[str]]] = {}


def claim_model(key: str, tower: str, build) -> nn.Module:
    entry = _PAIRS.get(key)
    blip = entry[0]() if entry else None
    if blip is None or tower in entry[1]:
        blip = build()
        _PAIRS[key] = (weakref.ref(blip), {tower})
    else:
        entry[1].add(tower)
    return blip


def resolve_tower(modality: str, tower: str | None) -> str:
    tower = tower or TOWER_BY_NAME.get(modality.lower())
    if tower not in ("vision", "text"):
        raise ValueError(
            f"encoder {modality!r}: hf_blip needs options.tower = 'vision' or 'text', got {tower!r}"
        )
    return tower


@register_encoder("hf_blip")
class HFBlipEncoder(Encoder):
    """Factory of the two tower encoders (``tower`` option); both hold a plain reference ``blip``."""

    blip_tower: str = ""

    def __init__(self, blip: nn.Module, tower_model: nn.Module, modality: str):
        super().__init__(tower_model, modality)
        object.__setattr__(self, "blip", blip)  # not a submodule: its heads belong to the model's head

    @classmethod
    def from_config(cls, config: dict, modality: str, tower: str | None = None, max_length: int = 35):
        tf = require("transformers", "hf")
        tower = resolve_tower(modality, tower)

        def build():
            return tf.BlipForImageTextRetrieval(tf.BlipConfig(**config)).eval()

        blip = claim_model("config:" + json.dumps(config, sort_keys=True), tower, build)
        return make_tower(blip, tower, modality, max_length)

    @classmethod
    def from_pretrained(cls, path: str, modality: str, tower: str | None = None, max_length: int = 35):
        tf = require("transformers", "hf")
        tower = resolve_tower(modality, tower)
        key = os.path.abspath(path) if os.path.isdir(path) else path
        blip = claim_model(key, tower, lambda: tf.BlipForImageTextRetrieval.from_pretrained(path).eval())
        encoder = make_tower(blip, tower, modality, max_length)
        encoder.source = path
        return encoder


def make_tower(blip: nn.Module, tower: str, modality: str, max_length: int) -> HFBlipEncoder:
    if tower == "vision":
        return BlipVisionTower(blip, blip.vision_model, modality)
    encoder = BlipTextTower(blip, blip.text_encoder, modality)
    encoder.max_length = max_length
    return encoder


class BlipVisionTower(HFBlipEncoder):
    blip_tower = "vision"
    pre_norm = True

    def __init__(self, blip: nn.Module, tower_model: nn.Module, modality: str):
        super().__init__(blip, tower_model, modality)
        self.dim = tower_model.config.hidden_size
        self.num_layers = tower_model.config.num_hidden_layers
        self._processor = None

    def embed(self, inputs: Any) -> EncoderState:
        self.check_input(inputs)
        pixels = inputs["pixel_values"] if isinstance(inputs, dict) else inputs
        return EncoderState(self.model.embeddings(pixels), None, n_prefix=1)  # (B, 1 + patches, D)

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        return state.replace(tokens=self.model.encoder.layers[i](state.tokens))

    def finalize(self, state: EncoderState) -> EncoderState:
        return state.replace(tokens=self.model.post_layernorm(state.tokens))

    def block(self, i: int) -> nn.Module:
        return self.model.encoder.layers[i]

    def linears(self, i: int) -> dict[str, nn.Linear]:
        b = self.block(i)
        return {"qkv": b.self_attn.qkv, "o": b.self_attn.projection, "fc1": b.mlp.fc1, "fc2": b.mlp.fc2}

    def norms(self, i: int) -> dict[str, nn.Module]:
        b = self.block(i)
        return {"ln_attn": b.layer_norm1, "ln_ffn": b.layer_norm2}

    def reference_forward(self, inputs: Any) -> Tensor:
        pixels = inputs["pixel_values"] if isinstance(inputs, dict) else inputs
        return self.model(pixel_values=pixels).last_hidden_state

    def collate(self, items: list[Any]) -> dict[str, Tensor]:
        if self.source is None:
            raise ValueError(f"encoder {self.modality!r}: a randomly initialised BLIP has no image processor")
        if self._processor is None:
            self._processor = require("transformers", "hf").AutoImageProcessor.from_pretrained(self.source)
        images = []
        for j, item in enumerate(items):
            if isinstance(item, str):
                pil = require("PIL.Image", "train")
                try:
                    item = pil.open(item).convert("RGB")
                except OSError as e:
                    raise ValueError(
                        f"encoder {self.modality!r}: item {j}: cannot read image {item!r}: {e}"
                    ) from e
            images.append(item)
        return {"pixel_values": self._processor(images=images, return_tensors="pt")["pixel_values"]}


class BlipTextTower(HFBlipEncoder):
    blip_tower = "text"
    pre_norm = False
    max_length = 35  # the released UniAdapter/BLIP retrieval captions are cut at 35 tokens

    def __init__(self, blip: nn.Module, tower_model: nn.Module, modality: str):
        super().__init__(blip, tower_model, modality)
        self.dim = tower_model.config.hidden_size
        self.num_layers = tower_model.config.num_hidden_layers
        self._tokenizer = None

    def embed(self, inputs: Any) -> EncoderState:
        self.check_input(inputs, "input_ids")
        mask = inputs.get("attention_mask")
        pad = None if mask is None else mask == 0
        return EncoderState(self.model.embeddings(input_ids=inputs["input_ids"]), pad, n_prefix=1)

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        """Self-attention -> (cross-attention when extras carry image tokens) -> FFN."""
        bias = additive_attention_mask(state.pad_mask, state.tokens.dtype)  # (B, 1, 1, T)
        image = state.extras.get("encoder_hidden_states")  # (B, N, D_v) or None
        image_bias = additive_attention_mask(state.extras.get("encoder_pad_mask"), state.tokens.dtype)
        block = self.block(i)
        key_scale = state.extras.get("image_key_scale")  # (B, N) or None: frame-aware attention
        hook = None
        if image is not None and key_scale is not None:
            scale = key_scale.unsqueeze(-1)  # (B, N, 1): every head's key of image token n scaled alike
            hook = block.crossattention.self.key.register_forward_hook(
                lambda _m, _a, k: k * scale.to(k.dtype)
            )
        try:
            out = block(state.tokens, image, attention_mask=bias, encoder_attention_mask=image_bias)
        finally:
            if hook is not None:
                hook.remove()
        return state.replace(tokens=out)

    def block(self, i: int) -> nn.Module:
        return self.model.encoder.layer[i]

    def linears(self, i: int) -> dict[str, nn.Linear]:
        b = self.block(i)
        att = b.attention
        return {
            "q": att.self.query,
            "k": att.self.key,
            "v": att.self.value,
            "o": att.output.dense,
            "fc1": b.intermediate.dense,
            "fc2": b.output.dense,
        }

    def norms(self, i: int) -> dict[str, nn.Module]:
        b = self.block(i)
        norms = {"ln_attn": b.attention.output.LayerNorm, "ln_ffn": b.output.LayerNorm}
        if hasattr(b, "crossattention"):
            norms["ln_cross"] = b.crossattention.output.LayerNorm
        return norms

    def with_image(
        self,
        state: EncoderState,
        image: Tensor,
        image_pad: Tensor | None = None,
        key_scale: Tensor | None = None,
    ) -> EncoderState:
        """The state with image tokens (B, N, D_v) to cross-attend to (the ITM mode); ``key_scale``
        (B, N) multiplies each image token's cross-attention key (UniAdapter's frame-aware attention)."""
        extras = {
            **state.extras,
            "encoder_hidden_states": image,
            "encoder_pad_mask": image_pad,
            "image_key_scale": key_scale,
        }
        return state.replace(extras=extras)

    def reference_forward(self, inputs: Any) -> Tensor:
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        return out.last_hidden_state

    def collate(self, items: list[Any]) -> dict[str, Tensor]:
        if self.source is None:
            raise ValueError(f"encoder {self.modality!r}: a randomly initialised BLIP has no tokenizer")
        for j, item in enumerate(items):
            if not isinstance(item, str):
                raise ValueError(
                    f"encoder {self.modality!r}: item {j} is {type(item).__name__}, expected text"
                )
        if self._tokenizer is None:
            self._tokenizer = require("transformers", "hf").AutoTokenizer.from_pretrained(self.source)
        batch = self._tokenizer(
            items, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
