"""`video`: a clip as N frames through any frozen image tower, the frames of a batch as one batch.

    video: {type: video, path: runs/mnist-vit/image,
            options: {image_type: timm_vit, frames: 8, image_options: {}}}

``path``/``config`` are the image tower's (``image_type``: hf_vit, hf_clip_vision, timm_vit,
timm_cnn, ...). A clip (a video file path, or an (L, H, W, 3) uint8 array of frames) becomes
``frames`` frames sampled uniformly (``data.video``), preprocessed by the tower's own processor;
the B clips of a batch run through the tower's blocks as one batch of B·N frames, in lockstep with
the other encoders, so every block method (LoRA, adapters, prompts, UniAdapter, MWA) acts on
video exactly as on images, with the same modules for every frame. ``finalize`` regroups the
frames per clip: (B·N, T, D) -> (B, N·T, D) (each frame's prompts dropped first), and pooling
pools each frame as the tower does and averages the N frame features (temporal mean).

Inside the blocks a batch of this tower has B·N rows (``rows_per_example``): methods that pass
tokens between towers there (PMF, Wander with ``layers``) refuse it by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..config import ConfigError, from_dict
from ..data.video import read_clip, sample_indices
from ..registry import ENCODERS, register_encoder
from .base import Encoder, EncoderState, strip_prompts

BLIP_POOLS_FRAMES = (
    "BLIP's retrieval head pools the frames itself (its temporal model is frame-aware attention), "
    "so a temporal_transformer on the tower's pooling would never run; use one or the other"
)


@dataclass
class VideoOptions:
    image_type: str = "timm_vit"
    """Registered image encoder family that runs the frames."""
    frames: int = 8
    """Frames sampled per clip (uniformly: the middle frame of each of N equal segments)."""
    image_options: dict = field(default_factory=dict)
    """Options of the image encoder family."""


def parse_options(options: dict, modality: str) -> VideoOptions:
    opts = from_dict(VideoOptions, options, where=f"encoders.{modality}.options")
    if opts.frames < 1:
        raise ConfigError(f"encoders.{modality}.options.frames must be >= 1, got {opts.frames}")
    try:
        ENCODERS.get(opts.image_type)
    except KeyError as e:
        raise ConfigError(f"encoders.{modality}.options.image_type: {e.args[0]}") from None
    if opts.image_type == "video":
        raise ConfigError(f"encoders.{modality}.options.image_type: a video tower runs an image tower")
    return opts


@register_encoder("video")
class VideoEncoder(Encoder):
    """N frames per clip through a wrapped image ``Encoder`` (``self.model``)."""

    def __init__(self, image: Encoder, modality: str, frames: int):
        super().__init__(image, modality)
        self.frames = frames
        self.rows_per_example = frames
        self.dim, self.num_layers = image.dim, image.num_layers
        self.pre_norm, self.pooling = image.pre_norm, image.pooling
        self.frame_mixer: nn.Module | None = None  # (B, N, D) -> (B, N, D) before the mean

    def set_frame_mixer(self, mixer: nn.Module) -> None:
        """Install a trainable ``mixer`` over each clip's frame features (``temporal_transformer``);
        a plain reference: its parameters are registered under ``model.peft``, not the frozen tower."""
        if self.frame_mixer is not None:
            raise ValueError(
                f"encoder {self.modality!r} already has a frame mixer; attach one temporal_transformer"
            )
        object.__setattr__(self, "frame_mixer", mixer)

    @classmethod
    def from_pretrained(cls, path: str, modality: str, **options: Any) -> VideoEncoder:
        opts = parse_options(options, modality)
        image = ENCODERS.get(opts.image_type).from_pretrained(path, modality=modality, **opts.image_options)
        encoder = cls(image, modality, opts.frames)
        encoder.source = path
        return encoder

    @classmethod
    def from_config(cls, config: dict, modality: str, **options: Any) -> VideoEncoder:
        opts = parse_options(options, modality)
        image = ENCODERS.get(opts.image_type).from_config(config, modality=modality, **opts.image_options)
        return cls(image, modality, opts.frames)

    @property
    def blip_tower(self) -> str:
        """ "vision" when the frames run through BLIP's vision tower (the BLIP retrieval head applies)."""
        return getattr(self.model, "blip_tower", "")

    @property
    def blip(self) -> nn.Module | None:
        return getattr(self.model, "blip", None)

    # --- the image tower's blocks, on B·N frames ------------------------------------------------
    def embed(self, inputs: Any) -> EncoderState:
        return self.model.embed(inputs)

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        return self.model.run_block(i, state)

    def run_block_tail(self, i: int, state: EncoderState, n: int) -> Tensor:
        return self.model.run_block_tail(i, state, n)

    def block(self, i: int) -> nn.Module:
        return self.model.block(i)

    def linears(self, i: int) -> dict[str, nn.Linear]:
        return self.model.linears(i)

    def norms(self, i: int) -> dict[str, nn.Module]:
        return self.model.norms(i)

    @property
    def max_tokens(self) -> int | None:
        per_frame = self.model.max_tokens
        return None if per_frame is None else per_frame * self.frames

    # --- per clip ---------------------------------------------------------------------------------
    def finalize(self, state: EncoderState) -> EncoderState:
        """The tower's final norm, then (B·N, T, D) -> (B, N·T, D) without the frames' prompts;
        ``n_prefix`` keeps the per-frame count of prefix tokens (each frame's CLS), for pooling."""
        state = self.model.finalize(state)
        tokens, pad = strip_prompts(state)
        BN, T, D = tokens.shape
        B = BN // self.frames
        tokens = tokens.reshape(B, self.frames * T, D)
        pad = None if pad is None else pad.reshape(B, self.frames * T)
        return state.replace(tokens=tokens, pad_mask=pad, n_prompt=0)

    def frame_states(self, state: EncoderState) -> EncoderState:
        """A final (B, N·T, D) state as the tower's own (B·N, T, D) one."""
        B, NT, D = state.tokens.shape
        T = NT // self.frames
        pad = None if state.pad_mask is None else state.pad_mask.reshape(B * self.frames, T)
        return state.replace(tokens=state.tokens.reshape(B * self.frames, T, D), pad_mask=pad)

    def pool(self, state: EncoderState) -> Tensor:
        """Each frame pooled as the image tower pools, mixed over time by the frame mixer if one is
        installed, then the mean over the N frames: (B, D)."""
        frames = self.model.pool(self.frame_states(state))  # (B·N, D)
        frames = frames.reshape(-1, self.frames, frames.shape[-1])  # (B, N, D)
        if self.frame_mixer is not None:
            frames = self.frame_mixer(frames)
        return frames.mean(dim=1)

    def collate(self, items: list[Any]) -> Any:
        """Clips (paths or (L, H, W, 3) arrays) -> the image tower's batch of B·N frames."""
        frames = []
        for j, item in enumerate(items):
            clip = self.clip_frames(item, j)
            frames.extend(clip[k] for k in range(len(clip)))
        return self.model.collate(frames)

    def clip_frames(self, item: Any, j: int) -> np.ndarray:
        if isinstance(item, str):
            return read_clip(item, self.frames, "uniform", where=f"encoder {self.modality!r}, item {j}")
        clip = np.asarray(item.detach().cpu() if isinstance(item, Tensor) else item)
        if clip.ndim != 4 or clip.shape[-1] != 3 or len(clip) < 1:
            raise ValueError(
                f"encoder {self.modality!r}: item {j} is not a clip (L, H, W, 3), got {clip.shape}"
            )
        return clip[sample_indices(len(clip), self.frames)]

    def reference_forward(self, inputs: Any) -> Tensor:
        out = self.model.reference_forward(inputs)  # (B·N, T, D)
        return out.reshape(-1, self.frames * out.shape[1], out.shape[2])


def rows_per_example(encoder: nn.Module) -> int:
    """How many rows one example occupies in the encoder's block-level batch (a video tower: N)."""
    return int(getattr(encoder, "rows_per_example", 1))


def video_towers(method: str, encoders: dict, modalities: list[str], purpose: str) -> list[str]:
    """The ``modalities`` whose towers run several frames per example; none is an error naming ``method``."""
    video = [m for m in modalities if rows_per_example(encoders[m]) > 1]
    if not video:
        raise ValueError(f"{method}: the model has no video tower (type: video) {purpose}")
    return video


def refuse_frame_batches(method: str, encoders: dict, modalities: list[str]) -> None:
    """Methods that exchange tokens between towers inside the blocks need one row per example."""
    video = [m for m in modalities if rows_per_example(encoders[m]) > 1]
    if video:
        raise ValueError(
            f"{method}: tower {video[0]!r} runs {rows_per_example(encoders[video[0]])} frames per example "
            "through its blocks, and this method passes tokens between towers there; fuse its final "
            "sequences instead (wander without layers, late_fusion, lmf, tfn) or adapt it per tower"
        )
