"""`mwa`: MultiWay-Adapter (Long et al., "MultiWay-Adapter: Adapting large-scale multi-modal models
for scalable image-text retrieval", ICASSP 2024, arXiv 2309.01516).

Two parts (DESIGN §3.5):

- New Knowledge Extractor: per modality and layer, a bottleneck parallel to the FFN,
  y = x' + FFN(LN(x')) + s * ReLU(x' W_d) W_u, with x' the input of the FFN sub-layer (the residual
  stream after attention). Pre-LN encoders: x' is captured as the input of the block's ``ln_ffn``
  norm; post-LN (BERT): as the input of ``fc1`` (the attention output after its LayerNorm), so
  y = LN(x' + FFN(x') + s * A(x')). Either way the adapter output is added to ``fc2``'s output.
  W_u is zero-initialised.
- Alignment Enhancer: one feed-forward block shared by all modalities, applied to the residual
  stream after the chosen blocks, y <- y + FFN_shared(y). Encoders of different widths reach the
  shared block through per-modality linear projections in and out (orthogonal, transposed pair
  at init). Its output layer is zero-initialised, so the whole method is the frozen model at step 0.

The released code puts a full-width FFN enhancer in every layer (about 30% of the model); the paper
reports 2-3% extra parameters. ``enhancer_layers``/``enhancer_dim`` expose the trade-off; see
docs/methods/mwa.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..encoders.base import EncoderState
from ..registry import register_method
from .adaptformer import ParallelAdapter
from .base import Method, MethodConfig

SHARED_KEY = "enhancer"  # container key of the modality-shared enhancer blocks


@dataclass
class MWAConfig(MethodConfig):
    r: int = 64
    """Bottleneck width of each modality's parallel adapter (new knowledge extractor)."""
    scale: float = 1.0
    """Scaling factor s of the adapter output (the released COCO/Flickr runs use 1.0)."""
    dropout: float = 0.1
    """Dropout on the adapter's bottleneck activations."""
    enhancer_layers: list[int] | None = field(default_factory=lambda: [-2, -1])
    """Blocks after which the shared alignment enhancer runs, negative from the end (aligned across
    encoders of different depth); None: every block (the released code); []: no enhancer."""
    enhancer_dim: int | None = 512
    """Hidden width of the shared enhancer FFN; None: the encoder's own FFN width (released code)."""
    enhancer_width: int | None = None
    """Width of the shared enhancer space; None: the widest encoder. Encoders of another width get
    per-modality linear projections into and out of it."""
    enhancer_subln: bool = True
    """LayerNorm on the enhancer's hidden activations (the released torchscale FFN's sub-LN)."""
    enhancer_dropout: float = 0.0
    """Dropout on the enhancer's hidden activations."""

    def __post_init__(self) -> None:
        for name in ("r", "enhancer_dim", "enhancer_width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"mwa: {name} must be >= 1, got {value}")
        for name in ("dropout", "enhancer_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"mwa: {name} must be in [0, 1), got {getattr(self, name)}")


class SharedEnhancer(nn.Module):
    """Alignment enhancer FFN: fc2(dropout(subLN(GELU(fc1 h)))), (..., width) -> (..., width); zero at init."""

    def __init__(self, width: int, hidden: int, subln: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden) if subln else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.norm(F.gelu(self.fc1(h)))))  # (..., width)


class WidthBridge(nn.Module):
    """A modality's way into and out of the shared space: d_m -> width -> d_m, no biases."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.into = nn.Linear(dim, width, bias=False)  # pragma: no mutate (bias=None is also no bias)
        self.out = nn.Linear(width, dim, bias=False)  # pragma: no mutate
        nn.init.orthogonal_(self.into.weight)  # norm-preserving embedding (or projection)
        with torch.no_grad():
            self.out.weight.copy_(self.into.weight.t())  # its transpose maps back


def enhance(shared: SharedEnhancer, bridge: WidthBridge | None):
    """Block module y <- y + FFN_shared(y) for one modality (through its bridge if widths differ)."""

    def fn(state: EncoderState) -> EncoderState:
        x = state.tokens  # (B, T, d_m)
        h = x if bridge is None else bridge.into(x)  # (B, T, width)
        delta = shared(h)
        if bridge is not None:
            delta = bridge.out(delta)  # (B, T, d_m)
        return state.replace(tokens=x + delta)

    return fn


def enhancer_entries(cfg: MWAConfig, depths: dict[str, int]) -> list[int]:
    if cfg.enhancer_layers is None:  # every block, aligned from the end
        return list(range(-max(depths.values()), 0))
    return list(cfg.enhancer_layers)


@register_method("mwa")
class MultiWayAdapter(Method):
    config_class = MWAConfig
    identity_at_init = True
    acts_in_blocks = True  # the shared enhancer ties the towers that have blocks; others are skipped
    # Every parameter is on the path of every forward pass: the backbone runs all modalities each
    # step and each adapter/bridge/enhancer acts on its modality's full sequence. (A backbone that
    # skipped an absent modality would leave that modality's adapters unused; see the docs.)
    may_skip_params = False

    @classmethod
    def attach(cls, model, cfg: MWAConfig):
        mods = cls.modalities(model, cfg)
        if SHARED_KEY in mods:
            raise ValueError(f"mwa: a modality may not be named {SHARED_KEY!r}")
        encoders = model.backbone.encoders
        container = nn.ModuleDict()
        for m in mods:
            part = nn.ModuleDict()
            part["adapters"] = nn.ModuleDict(
                {str(i): cls.attach_adapter(model, m, i, cfg) for i in cls.layers(model, m, cfg)}
            )
            container[m] = part
        entries = enhancer_entries(cfg, {m: encoders[m].num_layers for m in mods})
        if entries:
            width = cfg.enhancer_width or max(encoders[m].dim for m in mods)
            hidden = cfg.enhancer_dim or cls.full_hidden(model, mods, width)
            shared = nn.ModuleDict()
            for j in entries:
                shared[str(j)] = SharedEnhancer(width, hidden, cfg.enhancer_subln, cfg.enhancer_dropout)
            container[SHARED_KEY] = shared
            for m in mods:
                cls.attach_enhancer(model, m, entries, shared, width, container[m], cfg)
        return container

    @classmethod
    def attach_adapter(cls, model, modality: str, layer: int, cfg: MWAConfig) -> ParallelAdapter:
        adapter = ParallelAdapter(model.backbone.encoders[modality].dim, cfg.r, cfg.scale, cfg.dropout)
        model.backbone.add_parallel_to_ffn(modality, layer, adapter)
        return adapter

    @classmethod
    def attach_enhancer(cls, model, modality, entries, shared, width, part, cfg: MWAConfig) -> None:
        enc = model.backbone.encoders[modality]
        n = enc.num_layers
        if cfg.enhancer_layers is None:  # "every block": the entries this encoder is deep enough for
            entries = [j for j in entries if -j <= n]
        layers = [model.backbone.resolve_layers(modality, [j])[0] for j in entries]
        if len(set(layers)) != len(layers):
            raise ValueError(f"mwa: enhancer_layers {entries} name one block of {modality!r} twice")
        bridges = nn.ModuleDict()
        for j, i in zip(entries, layers, strict=True):  # pragma: no mutate (equal lengths by construction)
            bridge = None
            if enc.dim != width:
                bridge = bridges[str(j)] = WidthBridge(enc.dim, width)
            model.backbone.add_block_module(modality, i, enhance(shared[str(j)], bridge), where="after")
        if len(bridges):
            part["bridges"] = bridges

    @staticmethod
    def full_hidden(model, mods: list[str], width: int) -> int:
        """The FFN width of an encoder of the shared width (4 * width if none has it)."""
        for m in mods:
            enc = model.backbone.encoders[m]
            fc1 = enc.linears(enc.num_layers - 1).get("fc1")  # pragma: no mutate (every block has one width)
            if enc.dim == width and fc1 is not None:
                return fc1.out_features
        return 4 * width
