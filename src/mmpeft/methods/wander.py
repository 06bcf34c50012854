"""`wander`: CP-factorised outer-product fusion of M token sequences.

Guo et al., "A Wander Through the Multimodal Landscape: Efficient Transfer Learning via Low-rank
Sequence Multimodal Adapter", AAAI 2025, arXiv 2412.08979.

Per modality m: Z_m = GELU(X_m W_m + b_m) (B, T_m, r) with padded rows zeroed; per CP component
i a token factor S_m^(i) (T_m x k) and a feature factor A_m^(i) (r x d). The fused tokens

    F = sum_i lambda_i * prod_m (S_m^(i)^T Z_m A_m^(i))      (B, k, d), never building (x)_m Z_m
    Y = residual + g * F                                       g zero-initialised

equal a contraction of the outer product of the M sequences with a rank-R weight tensor.
``cp_mode="factor_sum"`` is the released code's form (components summed inside each factor
before the product). Placement: after the last layer (the model's fusion; features = Y slot 0
or the slot mean), or at ``layers`` where F is broadcast back as dX_m = S_m F U_m, U_m = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..encoders.base import Encoder, EncoderState, strip_prompts
from ..encoders.features import FeatureTransformerConfig
from ..encoders.video import refuse_frame_batches
from ..registry import register_method
from .base import BlockUse, Method, MethodConfig

GELU_SECOND_MOMENT = 0.425  # E[GELU(x)^2] for x ~ N(0, 1): keeps each modality factor at unit variance


@dataclass
class WanderConfig(MethodConfig):
    k: int = 16
    """Number of fused tokens (the released code ties k = r)."""
    r: int = 16
    """Bottleneck width of each modality's down-projection."""
    rank: int = 8
    """CP rank R: components summed in the fusion (released name: drank)."""
    token_rank: int | None = None
    """factor_sum only: token-factor components summed (released name: trank); None means ``rank``."""
    cp_mode: Literal["exact", "factor_sum"] = "exact"
    """exact: sum over components of products; factor_sum: the released code's product of summed factors."""
    d: int | None = None
    """Common fused width; None means the anchor encoder's width."""
    max_len: int | dict | None = None
    """Longest token sequence per modality (an int for all, or {modality: n}); None asks the encoder."""
    anchor: str | None = None
    """Modality giving the residual (None: the first of ``modalities``); ``layers`` are counted in it."""
    residual: Literal["anchor", "pooled", "none"] = "anchor"
    """Post placement: the anchor's first k tokens, its pooled feature on every slot, or nothing."""
    output: Literal["first", "mean"] = "first"
    """Post placement: features are fused slot 0 or the mean of the k slots."""


def encoder_max_tokens(encoder: Encoder) -> int | None:
    """The longest token sequence an encoder produces, where its config says so."""
    for name in ("max_tokens", "max_positions"):  # max_positions: the hf_bert family
        n = getattr(encoder, name, None)
        if isinstance(n, int):
            return n
    cfg = getattr(encoder.model, "config", None)
    if isinstance(cfg, FeatureTransformerConfig):
        return cfg.max_len + int(cfg.cls_token)
    if isinstance(getattr(cfg, "max_position_embeddings", None), int):
        return cfg.max_position_embeddings
    size, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int):  # ViT family: patches + CLS/registers
        return (size // patch) ** 2 + getattr(encoder, "n_prefix", 1)
    return None


class ModalityFactors(nn.Module):
    """One modality's down-projection (d_m -> r) and CP factors S (R_t, T_m, k), A (R, r, d)."""

    def __init__(
        self, dim: int, max_tokens: int, k: int, r: int, d: int, rank: int, token_rank: int, exact: bool
    ):
        super().__init__()
        self.max_tokens = max_tokens
        self.down = nn.Linear(dim, r)
        nn.init.normal_(self.down.weight, std=dim**-0.5)  # unit-variance pre-activations
        nn.init.zeros_(self.down.bias)
        # S^T Z A has unit variance for unit-variance inputs: per component in exact mode, for the
        # summed factors in factor_sum mode (each of the n summed components gets 1/n of it)
        n_t, n_d = (1, 1) if exact else (token_rank, rank)
        self.S = nn.Parameter(torch.randn(token_rank, max_tokens, k) * (max_tokens * n_t) ** -0.5)
        self.A = nn.Parameter(torch.randn(rank, r, d) * (GELU_SECOND_MOMENT * r * n_d) ** -0.5)

    def project(self, tokens: Tensor, pad_mask: Tensor | None, modality: str) -> Tensor:
        """(B, T, d_m) -> Z (B, T, r) with padded rows zeroed."""
        if tokens.shape[1] > self.max_tokens:
            raise ValueError(
                f"wander: modality {modality!r} has {tokens.shape[1]} tokens but the adapter was built "
                f"for at most {self.max_tokens}; raise max_len for it (parameters depend on it)"
            )
        z = F.gelu(self.down(tokens))  # (B, T, r)
        if pad_mask is not None:
            z = z.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        return z


def modality_term(S: Tensor, z: Tensor, A: Tensor) -> Tensor:
    """S (R, T, k), Z (B, T, r), A (R, r, d) -> S^T Z A (B, R, k, d), cheaper contraction first."""
    T, k = S.shape[1:]
    r, d = A.shape[1:]
    # (mutation testing: the branch only picks the cheaper order, both give the same result, and
    # einsum labels of either case mean the same: mutants of these lines are equivalent)
    if k * r * (T + d) <= T * d * (r + k):  # pragma: no mutate  (always when k <= T and r <= d)
        return torch.einsum("bikr,ird->bikd", torch.einsum("itk,btr->bikr", S, z), A)  # pragma: no mutate
    return torch.einsum("itk,bitd->bikd", S, torch.einsum("btr,ird->bitd", z, A))  # pragma: no mutate


class WanderCore(nn.Module):
    """The fusion F (B, k, d) of M sequences, from each modality's factors."""

    def __init__(
        self, dims: dict, lengths: dict, k: int, r: int, d: int, rank: int, token_rank: int, exact: bool
    ):
        super().__init__()
        self.k, self.d, self.exact = k, d, exact
        self.factors = nn.ModuleDict(
            {
                m: ModalityFactors(dims[m], lengths[m], k, r, d, rank, rank if exact else token_rank, exact)
                for m in dims
            }
        )
        # exact mode: a product of M unit-variance terms per component, summed over R of them
        self.lam = nn.Parameter(torch.full((rank,), rank**-0.5)) if exact else None

    def project(self, inputs: dict[str, tuple[Tensor, Tensor | None]]) -> dict[str, Tensor]:
        return {m: self.factors[m].project(*inputs[m], m) for m in self.factors}

    def fuse(self, zs: dict[str, Tensor], absent: dict[str, Tensor] | None = None) -> Tensor:
        """{m: Z_m (B, T_m, r)} -> F (B, k, d); ``absent`` rows of a modality take no part (factor 1)."""
        prod = None
        for m, z in zs.items():
            f = self.factors[m]
            S, A = f.S[:, : z.shape[1]], f.A  # rows of S past T would act on padding
            if not self.exact:  # the released form: sum the components first (R = 1 below)
                S, A = S.sum(0, keepdim=True), A.sum(0, keepdim=True)
            p = modality_term(S, z, A)  # (B, R, k, d)
            if absent is not None and m in absent:  # the product over the present modalities only
                p = torch.where(absent[m].view(-1, 1, 1, 1), torch.ones_like(p), p)
            prod = p if prod is None else prod * p
        if self.exact:
            return torch.einsum("bikd,i->bkd", prod, self.lam)  # pragma: no mutate  (B, k, d)
        return prod[:, 0]

    def forward(self, inputs: dict[str, tuple[Tensor, Tensor | None]], absent=None) -> Tensor:
        return self.fuse(self.project(inputs), absent)

    def token_map(self, modality: str, T: int) -> Tensor:
        """S_m (T, k) for broadcasting back: the token factors summed, at one factor's variance."""
        S = self.factors[modality].S[:, :T]  # (R_t, T, k)
        return S.sum(0) * (S.shape[0] ** -0.5 if self.exact else 1.0)


def masked_absent(states: dict[str, EncoderState], active: bool) -> dict[str, Tensor] | None:
    """The batch's absences when the fusion leaves absent modalities out, else None."""
    return next(iter(states.values())).absent if active else None


def sequences(states: dict[str, EncoderState], modalities) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Each modality's tokens and pad mask without the prompts other methods inserted."""
    return {m: strip_prompts(states[m]) for m in modalities}


class WanderFusion(nn.Module):
    """Post placement: Y = residual + g * F (B, k, d) -> features (B, d)."""

    def __init__(self, core: WanderCore, anchor: str, residual: str, output: str):
        super().__init__()
        self.core, self.anchor, self.residual, self.output = core, anchor, residual, output
        self.gate = nn.Parameter(torch.zeros(core.d))  # Y equals the residual at step 0
        self.out_dim = core.d
        self.masks_absent = True  # absent modalities leave the product (model.missing=zeros)

    def residual_of(self, states: dict[str, EncoderState], backbone, fused: Tensor) -> Tensor:
        B, k, d = fused.shape
        if self.residual == "none":
            return fused.new_zeros(B, k, d)
        if self.residual == "pooled":
            pooled = backbone.encoders[self.anchor].pool(states[self.anchor])  # (B, d)
            return pooled.unsqueeze(1).expand(B, k, d)
        tokens, pad = strip_prompts(states[self.anchor])
        first = tokens[:, :k]  # (B, <=k, d)
        if pad is not None:
            first = first.masked_fill(pad[:, :k].unsqueeze(-1), 0.0)
        return F.pad(first, (0, 0, 0, k - first.shape[1]))  # (B, k, d): zero rows past the sequence

    def fused(self, states: dict[str, EncoderState], backbone) -> Tensor:
        """Y (B, k, d)."""
        f = self.core(
            sequences(states, self.core.factors), masked_absent(states, self.masks_absent)
        )  # (B, k, d)
        return self.residual_of(states, backbone, f) + self.gate * f

    def forward(self, states: dict[str, EncoderState], backbone) -> Tensor:
        y = self.fused(states, backbone)  # (B, k, d)
        return y[:, 0] if self.output == "first" else y.mean(dim=1)


class WanderLayer(nn.Module):
    """Per-layer placement: X_m += S_m F U_m with U_m (d, d_m) zero-initialised."""

    def __init__(self, core: WanderCore, dims: dict):
        super().__init__()
        self.core = core
        self.up = nn.ParameterDict({m: nn.Parameter(torch.zeros(core.d, dims[m])) for m in dims})
        self.masks_absent = True  # absent modalities leave the product (model.missing=zeros)

    def forward(self, step: int, states: dict[str, EncoderState]) -> dict[str, EncoderState]:
        inputs = sequences(states, self.up)
        fused = self.core(inputs, masked_absent(states, self.masks_absent))  # (B, k, d)
        out = dict(states)
        for m, (tokens, pad) in inputs.items():
            back = fused @ self.up[m]  # (B, k, d_m)
            token_map = self.core.token_map(m, tokens.shape[1])  # (T, k)
            delta = torch.einsum("tk,bke->bte", token_map, back)  # pragma: no mutate  (B, T, d_m)
            if pad is not None:
                delta = delta.masked_fill(pad.unsqueeze(-1), 0.0)
            s = states[m]
            if s.n_prompt:  # no update on prompt rows inserted after the prefix
                a = s.n_prefix
                gap = delta.new_zeros(delta.shape[0], s.n_prompt, delta.shape[2])
                delta = torch.cat([delta[:, :a], gap, delta[:, a:]], dim=1)
            out[m] = s.replace(tokens=s.tokens + delta)
        return out


def max_lengths(cfg: WanderConfig, encoders: dict, modalities: list[str]) -> dict[str, int]:
    if isinstance(cfg.max_len, dict):
        unknown = sorted(set(cfg.max_len) - set(modalities))
        if unknown:
            raise ValueError(f"wander: max_len names modalities {unknown} the method does not fuse")
    out = {}
    for m in modalities:
        n = cfg.max_len.get(m) if isinstance(cfg.max_len, dict) else cfg.max_len
        n = encoder_max_tokens(encoders[m]) if n is None else n
        if not isinstance(n, int) or n < 1:
            raise ValueError(
                f"wander: cannot tell the longest sequence of modality {m!r}; set max_len: {{{m}: N}}"
            )
        out[m] = n
    return out


@register_method("wander")
class Wander(Method):
    config_class = WanderConfig
    identity_at_init = True  # post: the states are untouched; per layer: U_m = 0
    min_modalities = 2
    provides_fusion = True
    modality_options = ("anchor", "max_len")
    missing = "an absent modality leaves the CP product (its factor is 1)"
    blockless_hint = "use post placement (layers: null), which fuses the final sequences of any tower"

    @classmethod
    def block_use(cls, cfg: WanderConfig) -> BlockUse:
        """Post placement fuses final sequences (any tower); ``layers`` acts between blocks."""
        return "" if cfg.layers is None else "some"

    @classmethod
    def block_requirement(cls) -> str:
        return "with layers: acts in blocks (skips towers without)"  # pragma: no mutate (display text)

    @classmethod
    def attach(cls, model, cfg: WanderConfig):
        mods = cls.modalities(model, cfg)
        encoders = model.backbone.encoders
        anchor = cfg.anchor or mods[0]
        if anchor not in mods:
            raise ValueError(f"wander: anchor {anchor!r} is not among the fused modalities {mods}")
        for name in ("k", "r", "rank"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"wander: {name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.cp_mode == "exact" and cfg.token_rank not in (None, cfg.rank):
            raise ValueError("wander: token_rank differs from rank only in cp_mode='factor_sum'")
        d = cfg.d or encoders[anchor].dim
        if cfg.layers is None and cfg.residual != "none" and encoders[anchor].dim != d:
            raise ValueError(
                f"wander: residual={cfg.residual!r} needs d == the anchor {anchor!r} width "
                f"{encoders[anchor].dim}, got d={d}; use residual='none' or another anchor"
            )
        dims = {m: encoders[m].dim for m in mods}
        lengths = max_lengths(cfg, encoders, mods)
        token_rank = cfg.token_rank or cfg.rank
        make_core = lambda: WanderCore(
            dims, lengths, cfg.k, cfg.r, d, cfg.rank, token_rank, cfg.cp_mode == "exact"
        )
        if cfg.layers is None:
            fusion = WanderFusion(make_core(), anchor, cfg.residual, cfg.output)
            fusion.masks_absent = model.missing.masks
            model.set_fusion(fusion)
            return fusion
        refuse_frame_batches("wander with layers", encoders, mods)
        container = nn.ModuleDict()
        for i in model.backbone.resolve_layers(anchor, cfg.layers):
            layer = WanderLayer(make_core(), dims)
            layer.masks_absent = model.missing.masks
            model.backbone.add_layer_module(model.backbone.step_of(anchor, i), layer)
            container[str(i)] = layer
        return container
