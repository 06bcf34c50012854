"""`hf_wav2vec2`: Hugging Face wav2vec 2.0 (Baevski et al., "wav2vec 2.0: A Framework for
Self-Supervised Learning of Speech Representations", NeurIPS 2020, arXiv 2006.11477) and HuBERT
(Hsu et al., "HuBERT: Self-Supervised Speech Representation Learning by Masked Prediction of
Hidden Units", TASLP 2021, arXiv 2106.07447), which share one architecture.

``embed`` runs the convolutional feature encoder (20 ms per frame), the feature projection and the
convolutional positional embedding. Two layer-norm variants exist (``config.do_stable_layer_norm``):
- False ("layer", base models): post-LN blocks, and the encoder ``layer_norm`` is applied right
  after the positional embedding, i.e. at the end of ``embed``;
- True ("stable layer norm", large models): pre-LN blocks, and the encoder ``layer_norm`` is the
  final norm, applied in ``finalize``.
Input: raw 16-kHz waveforms (B, samples), or a dict with ``input_values`` and an optional sample-level
``attention_mask`` (1 = real), which becomes the frame-level pad mask used by attention and pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import from_dict
from ..optional import require
from ..registry import register_encoder
from .base import Encoder, EncoderState, additive_attention_mask
from .hf_whisper import check_rate, load_checked, waveform_items

# a tiny random model for tests: 2 conv layers (stride 10), width 32, 2 blocks
TINY_WAV2VEC2 = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16),
    conv_kernel=(10, 3),
    conv_stride=(5, 2),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    vocab_size=32,
)
CONFIG_CLASSES = {"wav2vec2": "Wav2Vec2Config", "hubert": "HubertConfig"}


@dataclass
class Wav2Vec2Options:
    sampling_rate: int = 16000
    """Sampling rate of the waveforms given to ``collate``; must be the feature extractor's (16 kHz).
    Resample other rates in the dataset reader."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers ("eager", "sdpa"); None: the library's default."""


def split_audio_input(inputs: Any, modality: str) -> tuple[Tensor, Tensor | None]:
    if isinstance(inputs, Tensor):
        return inputs, None
    if isinstance(inputs, dict) and "input_values" in inputs:
        return inputs["input_values"], inputs.get("attention_mask")
    raise ValueError(
        f"encoder {modality!r}: expected a (B, samples) waveform tensor or a dict with 'input_values'"
    )


@register_encoder("hf_wav2vec2")
class Wav2Vec2EncoderAdapter(Encoder):
    """Adapter of ``transformers.Wav2Vec2Model`` / ``HubertModel`` (wrapped as is in ``self.model``)."""

    pooling = "mean"

    def __init__(self, model: nn.Module, modality: str, options: Wav2Vec2Options | None = None):
        super().__init__(model, modality)
        cfg = model.config
        if cfg.model_type not in CONFIG_CLASSES:
            raise ValueError(
                f"encoder {modality!r}: hf_wav2vec2 wraps {sorted(CONFIG_CLASSES)} models, got {cfg.model_type!r}"
            )
        if getattr(cfg, "add_adapter", False):
            raise ValueError(f"encoder {modality!r}: wav2vec2 models with add_adapter=True are not supported")
        self.options = options or Wav2Vec2Options()
        self.dim = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.pre_norm = bool(cfg.do_stable_layer_norm)
        self._extractor = None
        model.eval()

    # --- building -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, modality: str, **options: Any) -> Wav2Vec2EncoderAdapter:
        """A local directory or hub name of a wav2vec2 / HuBERT checkpoint (heads such as CTC dropped)."""
        tf = require("transformers", "hf")
        opts = from_dict(Wav2Vec2Options, options, where=f"encoders.{modality}.options")
        encoder = cls(load_checked(tf.AutoModel, path, modality, opts.attn_implementation), modality, opts)
        encoder.source = path
        return encoder

    @classmethod
    def from_config(cls, config: dict, modality: str, **options: Any) -> Wav2Vec2EncoderAdapter:
        """A random model: ``{"model_type": "wav2vec2" | "hubert", **config fields}`` over ``TINY_WAV2VEC2``.
        ``do_stable_layer_norm=True`` (with ``feat_extract_norm="layer"``) gives the large variant."""
        tf = require("transformers", "hf")
        opts = from_dict(Wav2Vec2Options, options, where=f"encoders.{modality}.options")
        fields = {**TINY_WAV2VEC2, **(config or {})}
        kind = fields.pop("model_type", "wav2vec2")
        if opts.attn_implementation:
            fields["attn_implementation"] = opts.attn_implementation
        if kind not in CONFIG_CLASSES:
            raise ValueError(
                f"encoders.{modality}.config.model_type: {kind!r} is not one of {sorted(CONFIG_CLASSES)}"
            )
        model = tf.AutoModel.from_config(getattr(tf, CONFIG_CLASSES[kind])(**fields))
        return cls(model, modality, opts)

    def save_pretrained(self, path: str) -> None:
        """Save the model (and the feature extractor, if one was loaded) for ``from_pretrained``."""
        self.model.save_pretrained(path)
        if self._extractor is not None:
            self._extractor.save_pretrained(path)

    # --- running ------------------------------------------------------------------------------
    def _waveforms(self, inputs: Any) -> tuple[Tensor, Tensor | None]:
        self.check_input(inputs)
        values, mask = split_audio_input(inputs, self.modality)
        if values.ndim != 2:
            raise ValueError(
                f"encoder {self.modality!r}: expected waveforms (B, samples), got {tuple(values.shape)}"
            )
        return values.to(self.model.dtype), mask

    def embed(self, inputs: Any) -> EncoderState:
        m, enc = self.model, self.model.encoder
        values, mask = self._waveforms(inputs)  # (B, S), (B, S) or None
        feats = m.feature_extractor(values).transpose(1, 2)  # (B, T, C)
        valid = None
        if mask is not None:
            valid = m._get_feature_vector_attention_mask(feats.shape[1], mask)  # (B, T) bool
        h = m.feature_projection(feats)
        h = h[0] if isinstance(h, tuple) else h  # wav2vec2 also returns the normed features
        if m.training:
            h = m._mask_hidden_states(h)  # SpecAugment, as the library does in training
        if valid is not None:
            h = h.masked_fill(~valid[..., None], 0.0)  # padded frames enter the conv embedding as 0
        h = h + enc.pos_conv_embed(h)  # (B, T, D)
        if not self.pre_norm:
            h = enc.layer_norm(h)
        h = enc.dropout(h)
        return EncoderState(h, None if valid is None else ~valid)

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        bias = additive_attention_mask(state.pad_mask, state.tokens.dtype)  # (B, 1, 1, T) or None
        return state.replace(tokens=self.model.encoder.layers[i](state.tokens, attention_mask=bias))

    def finalize(self, state: EncoderState) -> EncoderState:
        if self.pre_norm:
            return state.replace(tokens=self.model.encoder.layer_norm(state.tokens))
        return state

    def block(self, i: int) -> nn.Module:
        return self.model.encoder.layers[i]

    def linears(self, i: int) -> dict[str, nn.Linear]:
        layer = self.model.encoder.layers[i]
        a, ff = layer.attention, layer.feed_forward
        return {
            "q": a.q_proj,
            "k": a.k_proj,
            "v": a.v_proj,
            "o": a.out_proj,
            "fc1": ff.intermediate_dense,
            "fc2": ff.output_dense,
        }

    def norms(self, i: int) -> dict[str, nn.Module]:
        layer = self.model.encoder.layers[i]
        return {"ln_attn": layer.layer_norm, "ln_ffn": layer.final_layer_norm}

    def reference_forward(self, inputs: Any) -> Tensor:
        values, mask = self._waveforms(inputs)
        return self.model(values, attention_mask=mask).last_hidden_state

    # --- preprocessing ------------------------------------------------------------------------
    def feature_extractor(self) -> Any:
        """The checkpoint's ``Wav2Vec2FeatureExtractor``; a default one (normalise, pad) for random models."""
        if self._extractor is None:
            tf = require("transformers", "hf")
            if self.source is not None:
                self._extractor = tf.AutoFeatureExtractor.from_pretrained(self.source)
            else:
                self._extractor = tf.Wav2Vec2FeatureExtractor(
                    feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True
                )
        return self._extractor

    def collate(self, items: list[Any]) -> dict[str, Tensor]:
        """1-D waveforms -> {"input_values": (B, S) padded, "attention_mask": (B, S)}.

        The attention mask is always returned, so padding is excluded from attention and pooling
        (the library's base checkpoints were trained without it; masking only removes the padding).
        """
        waves = waveform_items(items, self.modality)
        for j, w in enumerate(waves):
            if int(self.model._get_feat_extract_output_lengths(torch.tensor(len(w)))) < 1:
                raise ValueError(
                    f"encoder {self.modality!r}: item {j} has {len(w)} samples, too short for one frame"
                )
        fx = self.feature_extractor()
        check_rate(fx, self.options.sampling_rate, self.modality)
        out = fx(
            waves,
            sampling_rate=fx.sampling_rate,
            padding=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return {"input_values": out["input_values"], "attention_mask": out["attention_mask"]}
