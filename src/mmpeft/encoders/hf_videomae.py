"""`hf_videomae`: Hugging Face VideoMAE, a video transformer over space-time tubelets (pre-LN).

Tong et al., "VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video
Pre-Training", NeurIPS 2022, arXiv 2203.12602. A clip of ``num_frames`` frames (16 for the released
checkpoints) becomes (frames / tubelet_size) x (H / patch) x (W / patch) tokens (1,568 at 16 x 224²),
each a 2 x 16 x 16 tubelet, with fixed sinusoidal positions. One example is one sequence, so every
method, those that pass tokens between towers inside the blocks (PMF, Wander with ``layers``)
included, treats it like an image tower. There is no class token: pooling is the mean over the
tokens, as the released video classifier does (before its ``fc_norm``, which belongs to the
classifier); checkpoints saved with ``use_mean_pooling: false`` end with the model's LayerNorm.

Input: ``pixel_values`` (B, T, C, H, W). ``collate`` takes clip files (decoded with PyAV,
``mmpeft[video]``), uint8 frame arrays (L, H, W, 3) — ``num_frames`` are sampled uniformly — or
float arrays (T, C, H, W) already preprocessed; frames go through the checkpoint's image processor.
VideoMAE's attention takes no mask, so padded tokens are refused by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.video import read_clip, sample_indices
from ..registry import register_encoder
from ._hf_common import HFEncoder, cached_processor, hf_config, load_pretrained, transformers_module
from .base import EncoderState, masked_mean, strip_prompts


@register_encoder("hf_videomae")
class HFVideoMAEEncoder(HFEncoder):
    """``transformers.VideoMAEModel`` behind the encoder interface."""

    pre_norm = True
    pooling = "mean"
    LAYERS = ("encoder.layer",)
    LINEARS = {
        "q": ("attention.attention.query",),
        "k": ("attention.attention.key",),
        "v": ("attention.attention.value",),
        "o": ("attention.output.dense",),
        "fc1": ("intermediate.dense",),
        "fc2": ("output.dense",),
    }
    NORMS = {"ln_attn": ("layernorm_before",), "ln_ffn": ("layernorm_after",)}

    def __init__(self, model: nn.Module, modality: str):
        super().__init__(model, modality)
        cfg = model.config
        if cfg.model_type != "videomae":
            raise ValueError(
                f"encoder {modality!r} (hf_videomae): model_type {cfg.model_type!r} is not videomae"
            )
        self.dim, self.num_layers = cfg.hidden_size, cfg.num_hidden_layers
        self.frames = cfg.num_frames
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        self.input_shape = (cfg.num_frames, cfg.num_channels, size, size)

    @classmethod
    def from_pretrained(
        cls, path: str, modality: str, attn_implementation: str | None = None
    ) -> HFVideoMAEEncoder:
        """A local directory (offline) or a hub name (e.g. MCG-NJU/videomae-base)."""
        tf = transformers_module()
        what = f"encoder {modality!r} (hf_videomae)"
        model = load_pretrained(tf.VideoMAEModel, path, attn_implementation, what)
        encoder = cls(model.eval(), modality)
        encoder.source = path
        return encoder

    @classmethod
    def from_config(cls, config: dict, modality: str, attn_implementation: str | None = None):
        """Random weights from a HF config dict (``model_type`` videomae)."""
        tf = transformers_module()
        cfg = hf_config(config, "videomae", f"encoders.{modality}.config")
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return cls(tf.VideoMAEModel._from_config(cfg, **kwargs).eval(), modality)

    # --- the encoder interface ----------------------------------------------------------------
    def pixels(self, inputs: Any) -> Tensor:
        pixels = inputs.get("pixel_values") if isinstance(inputs, dict) else inputs
        if not isinstance(pixels, Tensor) or tuple(pixels.shape[1:]) != self.input_shape:
            got = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(
                f"encoder {self.modality!r} (hf_videomae): expected pixel_values (B, {', '.join(map(str, self.input_shape))}), got {got}"
            )
        return pixels

    def embed(self, inputs: Any) -> EncoderState:
        self.check_input(inputs)
        pixels = self.pixels(inputs)
        pixels = pixels.to(self.model.embeddings.patch_embeddings.projection.weight.dtype)
        return EncoderState(self.model.embeddings(pixels, None), None, n_prefix=0)  # (B, N, D)

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        if state.pad_mask is not None and bool(state.pad_mask.any()):
            raise ValueError(
                f"encoder {self.modality!r} (hf_videomae): VideoMAE's attention takes no mask, and this "
                "state has padded tokens (a method that pads, or a missing-modality fill)"
            )
        out = self.block(i)(state.tokens)
        return state.replace(tokens=out[0] if isinstance(out, tuple) else out)

    def finalize(self, state: EncoderState) -> EncoderState:
        norm = self.model.layernorm
        return state if norm is None else state.replace(tokens=norm(state.tokens))

    def pool(self, state: EncoderState) -> Tensor:
        """The mean over the tokens (prompts dropped): (B, D)."""
        tokens, pad = strip_prompts(state)
        return masked_mean(tokens, pad)

    def reference_forward(self, inputs: Any) -> Tensor:
        return self.model(pixel_values=self.pixels(inputs)).last_hidden_state

    def collate(self, items: list[Any]) -> Tensor:
        """Clips (files, uint8 (L, H, W, 3) frames, or preprocessed float (T, C, H, W)) -> (B, T, C, H, W)."""
        out = []
        for j, item in enumerate(items):
            where = f"encoder {self.modality!r}, item {j}"
            if isinstance(item, str):
                item = read_clip(item, self.frames, "uniform", where=where)
            clip = np.asarray(item.detach().cpu() if isinstance(item, Tensor) else item)
            if clip.dtype == np.uint8 and clip.ndim == 4 and clip.shape[-1] == 3:
                out.append(self.process(clip[sample_indices(len(clip), self.frames)], where))
            elif clip.ndim == 4 and tuple(clip.shape) == self.input_shape:
                out.append(torch.as_tensor(clip, dtype=torch.float32))
            else:
                raise ValueError(
                    f"{where}: expected a clip file, uint8 frames (L, H, W, 3) or a float array "
                    f"{self.input_shape}, got {clip.dtype} {clip.shape}"
                )
        return torch.stack(out)

    def process(self, frames: np.ndarray, where: str) -> Tensor:
        """(T, H, W, 3) uint8 frames -> (T, C, H, W) through the checkpoint's image processor."""
        proc = cached_processor(self, "image_processor")
        if proc is None:
            raise ValueError(
                f"{where}: raw frames need the checkpoint's image processor, and this encoder has none "
                "(built from a config); pass float arrays (T, C, H, W)"
            )
        return proc([list(frames)], return_tensors="pt")["pixel_values"][0]  # one video
