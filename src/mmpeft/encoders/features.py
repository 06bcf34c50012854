"""`features`: pre-extracted feature sequences through a small pre-LN transformer.

Used for CMU-MOSI/MOSEI-style inputs (COVAREP, Facet, GloVe ...): the transformer is first
trained on a source task and saved with ``save_pretrained``; it is then loaded frozen and adapted
(the Wander/MOSI protocol). The tiny random ``toy_*`` encoders are the same architecture.

Input: a float tensor (B, T, F), or a dict with ``values`` (B, T, F) and optional
``attention_mask`` (B, T) with 1 for real steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import atomic_write_bytes, load_safetensors, save_safetensors
from ..config import from_dict
from ..registry import register_encoder
from .base import Encoder, EncoderState, additive_attention_mask


@dataclass
class FeatureTransformerConfig:
    input_dim: int = 16
    """Width of each input feature vector."""
    dim: int = 32
    """Hidden width of the transformer."""
    depth: int = 2
    """Number of transformer blocks."""
    heads: int = 4
    """Attention heads (must divide ``dim``)."""
    mlp_ratio: float = 2.0
    """FFN width as a multiple of ``dim``."""
    max_len: int = 64
    """Longest sequence the position table holds."""
    cls_token: bool = True
    """Prepend a learned CLS token."""


class FeatureBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN x), then x + FFN(LN x)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def attention(self, x: Tensor, bias: Tensor | None) -> Tensor:
        B, T, D = x.shape
        split = lambda t: t.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, Dh)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, Dh)
        return self.o(out.transpose(1, 2).reshape(B, T, D))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.ln1(x), bias)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    def forward_tail(self, x: Tensor, bias: Tensor | None, n: int) -> Tensor:
        """The last n output rows only: queries and FFN for those rows, keys/values for all."""
        B, T, D = x.shape
        h = self.ln1(x)
        split = lambda t: t.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # (B, H, t, Dh)
        q, k, v = split(self.q(h[:, -n:])), split(self.k(h)), split(self.v(h))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, n, Dh)
        y = x[:, -n:] + self.o(out.transpose(1, 2).reshape(B, n, D))
        return y + self.fc2(F.gelu(self.fc1(self.ln2(y))))


class FeatureTransformer(nn.Module):
    """The plain model: input projection, CLS + positions, pre-LN blocks, final norm."""

    def __init__(self, cfg: FeatureTransformerConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"features encoder: dim {cfg.dim} is not divisible by heads {cfg.heads}")
        self.config = cfg
        self.proj = nn.Linear(cfg.input_dim, cfg.dim)
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02) if cfg.cls_token else None
        self.pos = nn.Parameter(torch.randn(1, cfg.max_len + int(cfg.cls_token), cfg.dim) * 0.02)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(FeatureBlock(cfg.dim, cfg.heads, hidden) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def embed(self, values: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        B, T, Fin = values.shape
        if Fin != self.config.input_dim:
            raise ValueError(f"features encoder: expected feature width {self.config.input_dim}, got {Fin}")
        if T > self.config.max_len:
            raise ValueError(f"features encoder: sequence of {T} steps exceeds max_len {self.config.max_len}")
        x = self.proj(values)  # (B, T, D)
        pad = None if valid is None else ~valid.bool()
        if self.cls is not None:
            x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)
            if pad is not None:
                pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=pad.device), pad], 1)
        return x + self.pos[:, : x.shape[1]], pad

    def forward(self, values: Tensor, valid: Tensor | None = None) -> Tensor:
        x, pad = self.embed(values, valid)
        bias = additive_attention_mask(pad, x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        atomic_write_bytes(
            os.path.join(path, "config.json"), json.dumps(asdict(self.config), indent=2).encode()
        )
        save_safetensors(self.state_dict(), os.path.join(path, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str) -> FeatureTransformer:
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"features encoder: no config.json in {path!r}")
        with open(cfg_file) as f:
            cfg = from_dict(FeatureTransformerConfig, json.load(f), where=cfg_file)
        model = cls(cfg)
        model.load_state_dict(load_safetensors(os.path.join(path, "model.safetensors")))
        return model


def split_feature_input(inputs: Any, modality: str) -> tuple[Tensor, Tensor | None]:
    if isinstance(inputs, Tensor):
        return inputs, None
    if isinstance(inputs, dict) and "values" in inputs:
        return inputs["values"], inputs.get("attention_mask")
    raise ValueError(f"encoder {modality!r}: expected a (B, T, F) tensor or a dict with 'values'")


@register_encoder("features")
class FeatureEncoder(Encoder):
    """Adapter of ``FeatureTransformer`` to the encoder interface."""

    def __init__(self, model: FeatureTransformer, modality: str):
        super().__init__(model, modality)
        self.dim = model.config.dim
        self.num_layers = model.config.depth
        self.pooling = "cls" if model.config.cls_token else "mean"

    @classmethod
    def from_config(cls, config: dict, modality: str) -> FeatureEncoder:
        cfg = from_dict(FeatureTransformerConfig, config, where=f"encoders.{modality}.config")
        return cls(FeatureTransformer(cfg), modality)

    @classmethod
    def from_pretrained(cls, path: str, modality: str) -> FeatureEncoder:
        encoder = cls(FeatureTransformer.from_pretrained(path), modality)
        encoder.source = path
        return encoder

    def save_pretrained(self, path: str) -> None:
        """config.json + model.safetensors; ``from_pretrained(path)`` (``path:`` in a run config) loads it."""
        self.model.save_pretrained(path)

    def embed(self, inputs: Any) -> EncoderState:
        self.check_input(inputs)
        values, valid = split_feature_input(inputs, self.modality)
        x, pad = self.model.embed(values, valid)
        return EncoderState(x, pad, n_prefix=int(self.model.config.cls_token))

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        bias = additive_attention_mask(state.pad_mask, state.tokens.dtype)
        return state.replace(tokens=self.model.blocks[i](state.tokens, bias))

    def finalize(self, state: EncoderState) -> EncoderState:
        return state.replace(tokens=self.model.norm(state.tokens))

    def block(self, i: int) -> nn.Module:
        return self.model.blocks[i]

    def linears(self, i: int) -> dict[str, nn.Linear]:
        b = self.model.blocks[i]
        return {"q": b.q, "k": b.k, "v": b.v, "o": b.o, "fc1": b.fc1, "fc2": b.fc2}

    def norms(self, i: int) -> dict[str, nn.Module]:
        b = self.model.blocks[i]
        return {"ln_attn": b.ln1, "ln_ffn": b.ln2}

    def run_block_tail(self, i: int, state: EncoderState, n: int) -> Tensor:
        bias = additive_attention_mask(state.pad_mask, state.tokens.dtype)
        return self.model.blocks[i].forward_tail(state.tokens, bias, n)

    def reference_forward(self, inputs: Any) -> Tensor:
        values, valid = split_feature_input(inputs, self.modality)
        return self.model(values, valid)

    def collate(self, items: list[Any]) -> dict[str, Tensor]:
        """(T_i, F) arrays -> {"values": (B, T, F) zero-padded, "attention_mask": (B, T)}."""
        arrays = []
        for j, item in enumerate(items):
            a = torch.as_tensor(item, dtype=torch.float32)
            if a.ndim == 1:
                a = a[:, None]
            if a.ndim != 2 or a.shape[1] != self.model.config.input_dim:
                raise ValueError(
                    f"encoder {self.modality!r}: item {j} has shape {tuple(a.shape)}, "
                    f"expected (T, {self.model.config.input_dim})"
                )
            arrays.append(a)
        T = max(a.shape[0] for a in arrays)
        values = torch.zeros(len(arrays), T, self.model.config.input_dim)
        mask = torch.zeros(len(arrays), T, dtype=torch.long)
        for j, a in enumerate(arrays):
            values[j, : a.shape[0]] = a
            mask[j, : a.shape[0]] = 1
        return {"values": values, "attention_mask": mask}
