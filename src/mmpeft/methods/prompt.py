"""`prompt`: visual prompt tuning, per modality (Jia et al., "Visual Prompt Tuning", ECCV 2022,
arXiv 2203.12119).

``num_prompts`` learnable tokens are inserted right after the prefix tokens (CLS, registers)
of each chosen modality. Shallow: inserted once, before the first chosen block, and then
carried through the rest of the encoder like any token. Deep: a fresh set before every chosen
block, *replacing* the previous block's prompt outputs, so the sequence stays T + num_prompts
long. ``EncoderState.n_prompt`` records them (pooling drops them) and the pad mask gains
False (attendable) columns. With ``layers: [-2, -1]`` the blocks before run without autograd.

VPT initialises prompts Xavier-uniform with a bound derived from the ViT patch size; that has
no meaning for text, audio or feature encoders, so prompts here start from N(0, init_std).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..encoders.base import EncoderState
from ..registry import register_method
from .base import Method, MethodConfig


@dataclass
class PromptConfig(MethodConfig):
    num_prompts: int = 10
    """Prompt tokens per chosen block (deep) or in total (shallow)."""
    deep: bool = True
    """VPT-deep: new prompts before every chosen block; False: VPT-shallow, once before the first."""
    dropout: float = 0.0
    """Dropout on the prompt tokens before they are inserted."""
    init_std: float = 0.02
    """Standard deviation of the prompts' normal initialisation."""

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ConfigError(f"prompt: num_prompts must be >= 1, got {self.num_prompts}")


class Prompts(nn.Module):
    """One modality's prompt tokens: (n_sets, P, D); set j goes before the j-th chosen block."""

    def __init__(self, n_sets: int, num_prompts: int, dim: int, dropout: float = 0.0, init_std: float = 0.02):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(n_sets, num_prompts, dim) * init_std)
        self.dropout = nn.Dropout(dropout)

    def insert(self, j: int, state: EncoderState, replace: bool) -> EncoderState:
        """Put prompt set j after the prefix; ``replace`` drops the previous set first."""
        x = state.tokens  # (B, T, D)
        prompts = self.dropout(self.tokens[j]).to(x.dtype).expand(x.shape[0], -1, -1)  # (B, P, D)
        return insert_after_prefix(state, prompts, replace)


def insert_after_prefix(state: EncoderState, prompts: Tensor, replace: bool) -> EncoderState:
    """``prompts`` (B, P, D) right after the prefix tokens, always attendable; ``replace`` drops the
    P prompt tokens a previous block's insertion left there (deep prompts)."""
    x = state.tokens  # (B, T, D)
    B, P = prompts.shape[:2]
    a = state.n_prefix
    rest = a + P if replace else a  # first token after the old prompts (if any are replaced)
    tokens = torch.cat([x[:, :a], prompts, x[:, rest:]], dim=1)  # (B, T', D)
    pad = state.pad_mask
    if pad is not None:
        attendable = torch.zeros(B, P, dtype=torch.bool, device=pad.device)
        pad = torch.cat([pad[:, :a], attendable, pad[:, rest:]], dim=1)  # (B, T')
    n_prompt = state.n_prompt if replace else state.n_prompt + P
    return state.replace(tokens=tokens, pad_mask=pad, n_prompt=n_prompt)


def inserter(prompts: Prompts, j: int, replace: bool):
    def fn(state: EncoderState) -> EncoderState:
        return prompts.insert(j, state, replace)

    return fn


@register_method("prompt")
class PromptTuning(Method):
    config_class = PromptConfig
    acts_in_blocks = True

    @classmethod
    def attach(cls, model, cfg: PromptConfig):
        container = nn.ModuleDict()
        for m in cls.modalities(model, cfg):
            encoder = model.backbone.encoders[m]
            layers = cls.layers(model, m, cfg)
            if not cfg.deep:
                layers = layers[:1]
            prompts = Prompts(len(layers), cfg.num_prompts, encoder.dim, cfg.dropout, cfg.init_std)
            for j, i in enumerate(layers):
                model.backbone.add_block_module(m, i, inserter(prompts, j, replace=j > 0), where="before")
            container[m] = prompts
        return container
