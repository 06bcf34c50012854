"""The encoder interface every backbone family implements (DESIGN §2).

An encoder turns one modality's raw input into a token sequence and exposes its transformer
blocks one at a time, so the lockstep backbone can run all modalities on one schedule and
methods can act between, around or inside blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

CANONICAL_LINEARS = ("q", "k", "v", "qkv", "o", "fc1", "fc2")
# "ln_attn"/"ln_ffn": the LayerNorm before (pre-LN) or after (post-LN) each sub-layer;
# "ln_cross": the LayerNorm after a cross-attention sub-layer (text towers with cross-attention)
CANONICAL_NORMS = ("ln_attn", "ln_ffn", "ln_cross")


@dataclass
class EncoderState:
    """One modality's sequence between blocks.

    tokens:   (B, T, D) hidden states.
    pad_mask: (B, T) bool, True where a token is padding (never attended); None = no padding.
    n_prefix: leading special tokens (CLS, distillation, register tokens) kept at the front.
    n_prompt: prompt tokens inserted right after the prefix by methods (removed by pooling).
    extras:   family-specific tensors a block needs (e.g. rotary or relative position terms).
    absent:   which examples of the batch lack each modality, {modality: (B,) bool, True = absent};
              set by the model (``mmpeft.missing``) on every modality's state, the same mapping on
              each, so a module of one modality can see the others' absences; None when every
              example has every modality.
    """

    tokens: Tensor
    pad_mask: Tensor | None = None
    n_prefix: int = 0
    n_prompt: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    absent: dict[str, Tensor] | None = None

    def replace(self, **changes: Any) -> EncoderState:
        return dataclasses.replace(self, **changes)

    @property
    def valid_mask(self) -> Tensor:
        """(B, T) bool, True where a token is real."""
        B, T, _ = self.tokens.shape
        if self.pad_mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=self.tokens.device)
        return ~self.pad_mask


def additive_attention_mask(pad_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, T) padding mask -> (B, 1, 1, T) additive mask for HF/eager/SDPA attention."""
    if pad_mask is None:
        return None
    bias = torch.zeros(pad_mask.shape, dtype=dtype, device=pad_mask.device)
    bias = bias.masked_fill(pad_mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def masked_mean(tokens: Tensor, pad_mask: Tensor | None) -> Tensor:
    """Mean over real tokens: (B, T, D) -> (B, D)."""
    if pad_mask is None:
        return tokens.mean(dim=1)
    keep = (~pad_mask).unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
    return (tokens * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class Encoder(nn.Module):
    """Base class of encoder adapters. Subclasses wrap a library model in ``self.model``.

    The wrapped model is never rewritten: methods wrap or hook it, so ``self.model.state_dict()``
    keeps the keys of the original checkpoint.
    """

    modality: str
    dim: int
    num_layers: int
    pooling: str = "cls"  # "cls" (first prefix token) or "mean" (over real, non-prompt tokens)
    pre_norm: bool = True  # LayerNorm before each sub-layer (ViT) or after the residual add (BERT)

    def __init__(self, model: nn.Module, modality: str):
        super().__init__()
        self.model = model
        self.modality = modality
        self.source: str | None = None  # path or hub name it was loaded from (processors load from it)

    # --- the five members every family implements -------------------------------------------
    def embed(self, inputs: Any) -> EncoderState:
        raise NotImplementedError

    def run_block(self, i: int, state: EncoderState) -> EncoderState:
        raise NotImplementedError

    def finalize(self, state: EncoderState) -> EncoderState:
        """Apply what follows the last block (final norm); identity by default."""
        return state

    def block(self, i: int) -> nn.Module:
        raise NotImplementedError

    def linears(self, i: int) -> dict[str, nn.Linear]:
        """Block i's projections under canonical names (a subset of ``CANONICAL_LINEARS``)."""
        raise NotImplementedError

    def norms(self, i: int) -> dict[str, nn.Module]:
        """Block i's LayerNorms under canonical names (``CANONICAL_NORMS``); see ``pre_norm``."""
        return {}

    def run_block_tail(self, i: int, state: EncoderState, n: int) -> Tensor:
        """Output rows of the last ``n`` tokens of block i, (B, n, D).

        PMF's query stage keeps only these rows; families override this to compute attention
        queries and the FFN for those rows alone. The default runs the whole block.
        """
        return self.run_block(i, state).tokens[:, -n:]

    def collate(self, items: list[Any]) -> Any:
        """Raw examples of this modality (texts, images, waveforms, arrays) -> one batch of inputs,
        through the family's own tokenizer / processor. Errors name the offending item."""
        raise NotImplementedError(f"encoder {type(self).__name__} cannot preprocess raw inputs")

    def reference_forward(self, inputs: Any) -> Tensor:
        """The wrapped library's own forward, last hidden state (B, T, D), for parity tests."""
        raise NotImplementedError

    @property
    def max_tokens(self) -> int | None:
        """Longest token sequence ``embed`` produces, where the family fixes it (None: unbounded)."""
        return None

    # --- shared helpers -----------------------------------------------------------------------
    def forward(self, inputs: Any) -> EncoderState:
        state = self.embed(inputs)
        for i in range(self.num_layers):
            state = self.run_block(i, state)
        return self.finalize(state)

    def pool(self, state: EncoderState) -> Tensor:
        """(B, T, D) final state -> (B, D) by ``self.pooling``; prompt tokens are excluded."""
        if self.pooling == "cls" and state.n_prefix > 0:
            return state.tokens[:, 0]
        tokens, pad = strip_prompts(state)
        return masked_mean(tokens, pad)

    def check_input(self, inputs: Any, key: str | None = None) -> None:
        if inputs is None:
            raise ValueError(f"encoder {self.modality!r}: no input given for this modality")
        if key is not None and (not isinstance(inputs, dict) or key not in inputs):
            got = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ValueError(f"encoder {self.modality!r}: input needs key {key!r}, got {got}")


def strip_prompts(state: EncoderState) -> tuple[Tensor, Tensor | None]:
    """Tokens and pad mask without the prompt tokens methods inserted after the prefix."""
    if state.n_prompt == 0:
        return state.tokens, state.pad_mask
    a, b = state.n_prefix, state.n_prefix + state.n_prompt
    tokens = torch.cat([state.tokens[:, :a], state.tokens[:, b:]], dim=1)
    pad = None if state.pad_mask is None else torch.cat([state.pad_mask[:, :a], state.pad_mask[:, b:]], 1)
    return tokens, pad


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module
