"""`missing_prompts`: missing-aware prompts, a prompt set per pattern of present modalities.

Lee et al., "Multimodal Prompting with Missing Modalities for Visual Recognition", CVPR 2023,
arXiv 2303.03369. A frozen transformer gets learnable prompt tokens in its first blocks, and
which prompts an example gets depends on which of its modalities are present (the paper's
"missing-aware prompts": complete, text-missing and image-missing sets for two modalities).

Here every tower with blocks among ``modalities`` gets its own prompts (the paper has one
single-stream ViLT; our towers are separate). The pattern is read over all of the model's
modalities, so a tower also learns what to do when another tower's input is absent: with M
modalities there are 2^M - 1 patterns (at least one is present). Insertion follows input-level
prompting, deep: before each chosen block a fresh set of ``num_prompts`` tokens goes right after
the prefix, replacing the previous block's prompt outputs (as ``prompt`` with ``deep: true``).
The paper prompts the first 6 of ViLT's 12 blocks with 16 tokens; ``layers`` defaults to the
first half of each tower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..encoders.base import EncoderState
from ..registry import register_method
from .base import Method, MethodConfig
from .prompt import insert_after_prefix


@dataclass
class MissingPromptsConfig(MethodConfig):
    num_prompts: int = 16
    """Prompt tokens per chosen block (the paper's prompt length, 16)."""
    init_std: float = 0.02
    """Standard deviation of the prompts' normal initialisation."""
    dropout: float = 0.0
    """Dropout on the prompt tokens before they are inserted."""

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ConfigError(f"missing_prompts: num_prompts must be >= 1, got {self.num_prompts}")


def pattern_index(absent: dict[str, Tensor] | None, modalities: list[str], batch: int, device) -> Tensor:
    """(B,) index of each example's pattern of present modalities: sum of 2^i over present i, minus 1
    (so 2^M - 2 is "all present"; the all-absent pattern cannot occur)."""
    index = torch.zeros(batch, dtype=torch.long, device=device)
    for i, m in enumerate(modalities):
        present = torch.ones(batch, dtype=torch.bool, device=device)
        if absent is not None and m in absent:
            present = ~absent[m].to(device)
        index = index + present.long() * (1 << i)
    return index - 1


class MissingAwarePrompts(nn.Module):
    """One tower's prompts: (patterns, n_sets, P, D); set j goes before the j-th chosen block."""

    def __init__(
        self, modalities: list[str], n_sets: int, num_prompts: int, dim: int, std: float, dropout: float
    ):
        super().__init__()
        self.modalities = modalities
        patterns = 2 ** len(modalities) - 1
        self.tokens = nn.Parameter(torch.randn(patterns, n_sets, num_prompts, dim) * std)
        self.dropout = nn.Dropout(dropout)

    def insert(self, j: int, state: EncoderState) -> EncoderState:
        x = state.tokens  # (B, T, D)
        which = pattern_index(state.absent, self.modalities, x.shape[0], x.device)  # (B,)
        prompts = self.dropout(self.tokens[which, j]).to(x.dtype)  # (B, P, D): each example's pattern
        return insert_after_prefix(state, prompts, replace=j > 0)  # deep: replace the previous set


def inserter(prompts: MissingAwarePrompts, j: int):
    def fn(state: EncoderState) -> EncoderState:
        return prompts.insert(j, state)

    return fn


@register_method("missing_prompts")
class MissingPrompts(Method):
    config_class = MissingPromptsConfig
    acts_in_blocks = True
    may_skip_params = True  # a batch without some pattern leaves that pattern's prompts unused
    missing = "prompts chosen by which modalities the example has (a set per pattern)"

    @classmethod
    def attach(cls, model, cfg: MissingPromptsConfig):
        container = nn.ModuleDict()
        every = model.backbone.modalities  # the pattern is over all of the model's modalities
        for m in cls.modalities(model, cfg):
            encoder = model.backbone.encoders[m]
            if cfg.layers is None:
                layers = list(range(max(1, encoder.num_layers // 2)))  # the first half of the tower
            else:
                layers = cls.layers(model, m, cfg)
            prompts = MissingAwarePrompts(
                every, len(layers), cfg.num_prompts, encoder.dim, cfg.init_std, cfg.dropout
            )
            for j, i in enumerate(layers):
                model.backbone.add_block_module(m, i, inserter(prompts, j), where="before")
            container[m] = prompts
        return container
