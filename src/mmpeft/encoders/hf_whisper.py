"""`hf_whisper`: the encoder of Hugging Face Whisper (Radford et al., "Robust Speech Recognition via
Large-Scale Weak Supervision", ICML 2023, arXiv 2212.04356).

Pre-LN transformer over log-mel frames: two GELU convolutions (the second halves the frame rate),
a fixed sinusoidal position table, ``encoder_layers`` blocks and a final ``layer_norm``. Input: a
log-mel tensor (B, n_mels, F) or a dict with ``input_features``; output one token per 20 ms.

The position table has ``max_source_positions`` rows (1500 = 30 s), and Hugging Face's own forward
accepts exactly ``2 * max_source_positions`` mel frames. That is the default here, with exact parity.
Option ``window_seconds`` (e.g. 2.0) enables short windows, far cheaper on CPU: ``collate`` keeps
the first ``window_seconds`` of the 30-s log-mel and ``embed`` adds only the first ``ceil(F / 2)``
rows of the position table (the same model, fewer positions; the short-window recipe of
shared/weights/whisper_tiny_en_encoder/README.md). Whisper has no padding mask: a short clip is
padded with log-mel silence, which every frame attends to and mean pooling averages.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import from_dict
from ..optional import require
from ..registry import register_encoder
from .base import Encoder, EncoderState, additive_attention_mask

MEL_FRAMES_PER_SECOND = 100  # Whisper's log-mel hop: 160 samples at 16 kHz

# a tiny random encoder for tests: 16 mel bins, 32 frames (16 positions)
TINY_WHISPER = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    num_mel_bins=16,
    max_source_positions=16,
)


@dataclass
class WhisperOptions:
    window_seconds: float | None = None
    """None: standard 30-s inputs (exact Hugging Face parity). A number: windows of that length, with
    the position table cut to the frame count (faster; see the module docstring)."""
    sampling_rate: int = 16000
    """Sampling rate of the waveforms given to ``collate``; must be the feature extractor's (16 kHz).
    Resample other rates in the dataset reader."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers ("eager", "sdpa"); None: the library's default."""


def whisper_encoder_class() -> type:
    """``WhisperEncoder`` is not exported at the top level of transformers."""
    return require("transformers.models.whisper.modeling_whisper", "hf").WhisperEncoder


def load_checked(model_cls: Any, path: str, modality: str, attn: str | None, needed: str = "") -> nn.Module:
    """``model_cls.from_pretrained(path)``; weights the checkpoint lacks are an error, not random init.
    Only missing keys starting with ``needed`` count (e.g. "encoder." when the decoder is not used)."""
    kwargs = {"attn_implementation": attn} if attn else {}
    model, info = model_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith(needed))
    missing = [k for k in missing if not k.startswith("masked_spec_embed")]  # used only by SpecAugment
    if missing:
        raise ValueError(
            f"encoder {modality!r}: checkpoint {path!r} lacks {len(missing)} weights the encoder needs "
            f"(e.g. {missing[:3]}); they would be random"
        )
    return model


def waveform_items(items: list[Any], modality: str, index: list[int] | None = None) -> list[np.ndarray]:
    """Check raw audio items: each a non-empty, finite, 1-D float array. Errors name the item
    (``index`` maps positions in ``items`` to the caller's item numbers)."""
    out = []
    for j, item in zip(index or range(len(items)), items, strict=True):
        try:
            a = np.asarray(item.detach().cpu() if isinstance(item, Tensor) else item, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"encoder {modality!r}: item {j} is not a numeric array ({e})") from None
        if a.ndim != 1 or a.size == 0:
            raise ValueError(
                f"encoder {modality!r}: item {j} has shape {a.shape}; expected a non-empty 1-D waveform"
            )
        if not np.isfinite(a).all():
            raise ValueError(f"encoder {modality!r}: item {j} contains NaN or Inf samples")
        out.append(a)
    return out


def check_rate(extractor: Any, sampling_rate: int, modality: str) -> None:
    if sampling_rate != extractor.sampling_rate:
        raise ValueError(
            f"encoder {modality!r}: options.sampling_rate is {sampling_rate} but the feature extractor "
            f"expects {extractor.sampling_rate} Hz; resample the audio in the dataset reader"
        )


@register_encoder("hf_whisper")
class WhisperEncoderAdapter(Encoder):
    """Adapter of ``transformers.WhisperEncoder`` (wrapped as is in ``self.model``)."""

    pooling = "mean"
    pre_norm = True

    def __init__(self, model: nn.Module, modality: str, options: WhisperOptions | None = None):
        super().__init__(model, modality)
        self.options = options or WhisperOptions()
        cfg = model.config
        self.dim = cfg.d_model
        self.num_layers = cfg.encoder_layers
        self.full_frames = cfg.max_source_positions * model.conv1.stride[0] * model.conv2.stride[0]
        self._extractor = None
        if self.options.window_seconds is not None and self.options.window_seconds <= 0:
            raise ValueError(f"encoder {modality!r}: options.window_seconds must be > 0")
        model.eval()

    # --- building -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, modality: str, **options: Any) -> WhisperEncoderAdapter:
        """A local directory or hub name holding a full Whisper model or a bare ``WhisperEncoder``."""
        tf = require("transformers", "hf")
        opts = from_dict(WhisperOptions, options, where=f"encoders.{modality}.options")
        config = tf.WhisperConfig.from_pretrained(path)
        if "WhisperEncoder" in (config.architectures or []):
            model = load_checked(whisper_encoder_class(), path, modality, opts.attn_implementation)
        else:  # keys live under model.encoder.*: WhisperEncoder.from_pretrained would stay random
            full = load_checked(tf.WhisperModel, path, modality, opts.attn_implementation, needed="encoder.")
            model = full.get_encoder()
        encoder = cls(model, modality, opts)
        encoder.source = path
        return encoder

    @classmethod
    def from_config(cls, config: dict, modality: str, **options: Any) -> WhisperEncoderAdapter:
        """A random encoder from ``WhisperConfig`` fields (defaults: ``TINY_WHISPER``)."""
        tf = require("transformers", "hf")
        opts = from_dict(WhisperOptions, options, where=f"encoders.{modality}.options")
        fields = {**TINY_WHISPER, **(config or {})}
        if opts.attn_implementation:
            fields["attn_implementation"] = opts.attn_implementation
        model = whisper_encoder_class()(tf.WhisperConfig(**fields))
        return cls(model, modality, opts)

    def save_pretrained(self, path: str) -> None:
        """Save the bare encoder (and the feature extractor, if one was loaded) for ``from_pretrained``."""
        self.model.save_pretrained(path)
        if self._extractor is not None:
            self._extractor.save_pretrained(path)

    # --- running ------------------------------------------------------------------------------
    def _features(self, inputs: Any) -> Tensor:
        self.check_input(inputs)
        feats = inputs["input_features"] if isinstance(inputs, dict) else inputs
        if not isinstance(feats, Tensor) or feats.ndim != 3 or feats.shape[1] != self.model.num_mel_bins:
            got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise ValueError(
                f"encoder {self.modality!r}: expected log-mel input_features (B, {self.model.num_mel_bins}, "
                f"frames), got {got}"
            )
        frames = feats.shape[-1]
        if self.options.window_seconds is None and frames != self.full_frames:
            raise ValueError(
                f"encoder {self.modality!r}: Whisper takes exactly {self.full_frames} mel frames, got {frames}; "
                "pad to 30 s (collate does) or set options.window_seconds for shorter windows"
            )
        if frames > self.full_frames:
            raise ValueError(
                f"encoder {self.modality!r}: {frames} mel frames exceed the position table "
                f"({self.full_frames} frames)"
            )
        return feats.to(self.model.conv1.weight.dtype)

    def embed(self, inputs: Any) -> EncoderState:
        m = self.model
        feats = self._features(inputs)  # (B, n_mels, F)
        x = F.gelu(m.conv1(feats))
        x = F.gelu(m.conv2(x)).permute(0, 2, 1)  # (B, T, D), T = ceil(F / 2)
        x = x + m.embed_positions.weight[: x.shape[1]]  # all 1500 rows for standard inputs
        x = F.dropout(x, p=m.dropout, training=m.training)
        return EncoderState(x)

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        bias = additive_attention_mask(state.pad_mask, state.tokens.dtype)  # (B, 1, 1, T) or None
        return state.replace(tokens=self.model.layers[i](state.tokens, attention_mask=bias))

    def finalize(self, state: EncoderState) -> EncoderState:
        return state.replace(tokens=self.model.layer_norm(state.tokens))

    def block(self, i: int) -> nn.Module:
        return self.model.layers[i]

    def linears(self, i: int) -> dict[str, nn.Linear]:
        layer = self.model.layers[i]
        a = layer.self_attn
        return {
            "q": a.q_proj,
            "k": a.k_proj,
            "v": a.v_proj,
            "o": a.out_proj,
            "fc1": layer.fc1,
            "fc2": layer.fc2,
        }

    def norms(self, i: int) -> dict[str, nn.Module]:
        layer = self.model.layers[i]
        return {"ln_attn": layer.self_attn_layer_norm, "ln_ffn": layer.final_layer_norm}

    def reference_forward(self, inputs: Any) -> Tensor:
        """Hugging Face's forward; a short window runs it on a copy whose position table is cut."""
        feats = self._features(inputs)
        frames = feats.shape[-1]
        if frames == self.full_frames:
            return self.model(feats).last_hidden_state
        short = copy.deepcopy(self.model)  # the README recipe; the wrapped model stays untouched
        n = frames // (short.conv1.stride[0] * short.conv2.stride[0])
        short.config.max_source_positions = n
        short.embed_positions = nn.Embedding.from_pretrained(self.model.embed_positions.weight[:n].clone())
        return short(feats).last_hidden_state

    # --- preprocessing ------------------------------------------------------------------------
    def feature_extractor(self) -> Any:
        """The checkpoint's ``WhisperFeatureExtractor``; a default one for random models."""
        if self._extractor is None:
            tf = require("transformers", "hf")
            if self.source is not None:
                self._extractor = tf.AutoFeatureExtractor.from_pretrained(self.source)
            else:
                self._extractor = tf.WhisperFeatureExtractor(feature_size=self.model.num_mel_bins)
        return self._extractor

    @property
    def max_tokens(self) -> int:
        """Tokens per input: the conv stem halves the mel frames of a window."""
        return math.ceil(self.window_frames() / 2)

    def window_frames(self) -> int:
        """Mel frames per input: the full table, or ``window_seconds`` at Whisper's 100 frames/s."""
        if self.options.window_seconds is None:
            return self.full_frames
        n = int(math.ceil(self.options.window_seconds * MEL_FRAMES_PER_SECOND))
        return max(1, min(n, self.full_frames))

    def collate(self, items: list[Any]) -> dict[str, Tensor]:
        """1-D waveforms (at ``options.sampling_rate``) or precomputed (n_mels, frames) log-mels
        -> {"input_features": (B, n_mels, frames)} cut or padded to the window."""
        n_mels = self.model.num_mel_bins
        mels: list[np.ndarray | None] = [None] * len(items)
        wave_idx = []
        for j, item in enumerate(items):
            a = np.asarray(item.detach().cpu() if isinstance(item, Tensor) else item)
            if a.ndim == 2:
                if a.shape[0] != n_mels or a.shape[1] == 0 or not np.isfinite(a).all():
                    raise ValueError(
                        f"encoder {self.modality!r}: item {j} has shape {a.shape}; a log-mel item must be "
                        f"finite with shape ({n_mels}, frames)"
                    )
                mels[j] = a.astype(np.float32)
            else:
                wave_idx.append(j)
        if wave_idx:
            waves = waveform_items([items[j] for j in wave_idx], self.modality, wave_idx)
            fx = self.feature_extractor()
            check_rate(fx, self.options.sampling_rate, self.modality)
            out = fx(waves, sampling_rate=fx.sampling_rate, return_tensors="np")["input_features"]
            for k, j in enumerate(wave_idx):
                mels[j] = out[k]
        target = self.window_frames()
        batch = np.stack([fit_frames(m, target) for m in mels])  # (B, n_mels, target)
        return {"input_features": torch.from_numpy(batch)}


def fit_frames(mel: np.ndarray, frames: int) -> np.ndarray:
    """Cut a (n_mels, F) log-mel to ``frames`` or pad it with its minimum (log-mel silence)."""
    if mel.shape[1] >= frames:
        return mel[:, :frames]
    pad = np.full((mel.shape[0], frames - mel.shape[1]), mel.min(), dtype=mel.dtype)
    return np.concatenate([mel, pad], axis=1)
