"""`uniadapter`: one adapter per layer index, shared by the vision, text and cross-modal branches.

Lu et al., "UniAdapter: Unified Parameter-Efficient Transfer Learning for Cross-modal Modeling",
ICLR 2024, arXiv 2302.06605.

One module per layer index (schedule step) holds a shared LayerNorm LN_a and down-projection
W_d (d -> r) and one up-projection per branch (vision W_v, text W_t, cross-modal W_m)::

    h      = Dropout(ReLU(LN_a(x) W_d))                      # (B, T, r), shared
    A_b(x) = s · h W_b                                       # branch b: vision, text, ...
    A_m(x) = s · LN_m(h W_m + h W_t)                         # cross-modal branch

Insertion (hooks only; the frozen modules are never replaced, state-dict keys never change):

    pre-LN block   y = x' + MLP(LN(x')) + A_b(x')            x' = input of ln_ffn, added to fc2's output
    post-LN block  y = LN(a + FFN(a)) + A_b(a)               a = input of fc1, added to ln_ffn's output
    cross layer    y = LN(c + FFN(c)) + A_t(a) + A_m(c)      "query residual": a = self-attention output
                   (ln_attn's output, the query before cross-attention), c = cross-attention output
                   (ln_cross's output); used by encoders whose blocks have cross-attention (BLIP text).

Generic route: the modalities active at one schedule step (encoders aligned from the end, as the
backbone runs them) share LN_a and W_d when their widths match; otherwise each gets its own, with a
warning. The faithful BLIP route (``uniadapter_blip``) adds the BLIP retrieval head, ITC + ITM
losses and ITM re-ranking.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_method
from .base import Method, MethodConfig

VISION_NAMES = {"image", "images", "vision", "visual", "video", "frames", "pixel_values"}
TEXT_NAMES = {"text", "texts", "caption", "captions", "question", "query", "language", "sentence"}


@dataclass
class UniAdapterConfig(MethodConfig):
    r: int = 128
    """Bottleneck width. 512 in the released configs; 128 gives the paper's 2.2% of BLIP-base."""
    scale: float = 0.1
    """Output scale s of every branch (released: 0.1)."""
    dropout: float = 0.0
    """Dropout on the shared bottleneck activation h (released: 0.0)."""
    init: Literal["zero", "official"] = "zero"
    """"zero": every up-projection starts at zero (identity at step 0). "official": the released init
    (only the text up-projection is zero; vision and cross-modal ones ~ N(0, 0.02))."""
    branches: dict[str, str] | None = None
    """Modality -> branch ("vision", "text" or a new name with its own up-projection). Unlisted
    modalities: by name (image/video... -> vision, text/caption... -> text), else a pre-LN encoder
    -> vision and a post-LN encoder -> text."""
    share: bool = True
    """Share LN_a and W_d across the modalities of one layer index (False: per-modality modules)."""
    cross_modal: bool = True
    """Add the cross-modal branch (W_m, LN_m) on encoders whose blocks have cross-attention."""
    blip_head: bool = True
    """On BLIP towers, install the checkpoint's retrieval head (vision_proj, text_proj, itm_head)."""
    itc_temperature: float = 0.07
    """ITC temperature of the BLIP head (BLIP's initial value; HF checkpoints do not carry it)."""
    frame_aware: bool = True
    """BLIP route with a video vision tower: frame-aware attention in ITM's cross-attention (each
    frame's patch keys weighted by the text's similarity to that frame; parameter-free)."""


class UniAdapterModule(nn.Module):
    """The adapter of one layer index: (B, T, dim) -> (B, T, dim) per branch."""

    def __init__(
        self,
        dim: int,
        r: int,
        branches: Sequence[str],
        cross_branch: str | None = None,
        scale: float = 0.1,
        dropout: float = 0.0,
        init: str = "zero",
    ):
        super().__init__()
        self.ln = nn.LayerNorm(dim)  # LN_a
        self.down = nn.Linear(dim, r)  # W_d
        self.up = nn.ModuleDict({branch_key(b): nn.Linear(r, dim) for b in dict.fromkeys(branches)})
        self.cross_branch = cross_branch  # the branch whose up-projection joins W_m (the query side)
        if cross_branch is not None:
            if branch_key(cross_branch) not in self.up:
                raise ValueError(f"uniadapter: cross-modal branch needs the {cross_branch!r} up-projection")
            self.cross_up = nn.Linear(r, dim)  # W_m
            self.cross_ln = nn.LayerNorm(dim)  # LN_m
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters(init)

    def reset_parameters(self, init: str) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        ups = dict(self.up.items())
        if self.cross_branch is not None:
            ups["cross"] = self.cross_up  # pragma: no mutate (the key is only told apart from text's)
        for key, lin in ups.items():
            nn.init.zeros_(lin.bias)
            if init == "official" and key != branch_key("text"):
                nn.init.normal_(lin.weight, std=0.02)  # the released code re-inits these with BERT's init
            elif init in ("zero", "official"):
                nn.init.zeros_(lin.weight)
            else:
                raise ValueError(f"uniadapter: unknown init {init!r}; use 'zero' or 'official'")

    def hidden(self, x: Tensor) -> Tensor:
        return self.dropout(F.relu(self.down(self.ln(x))))  # (B, T, r)

    def forward(self, x: Tensor, branch: str) -> Tensor:
        return self.scale * self.up[branch_key(branch)](self.hidden(x))  # (B, T, D)

    def cross(self, x: Tensor) -> Tensor:
        h = self.hidden(x)  # (B, T, r)
        both = self.cross_up(h) + self.up[branch_key(self.cross_branch)](h)  # (B, T, D)
        return self.scale * self.cross_ln(both)


def branch_key(branch: str) -> str:
    # suffixed so a branch named like a modality is not counted as that modality's parameters
    return f"{branch}_branch"


def default_branch(modality: str, pre_norm: bool) -> str:
    if modality.lower() in VISION_NAMES:
        return "vision"
    if modality.lower() in TEXT_NAMES:
        return "text"
    return "vision" if pre_norm else "text"


# --- insertion ---------------------------------------------------------------------------------
def insert_parallel(backbone, modality: str, layer: int, adapter: UniAdapterModule, branch: str) -> None:
    """Pre-LN block: y = x' + MLP(LN(x')) + A(x'), x' = the FFN sub-layer's input."""
    backbone.add_parallel_to_ffn(modality, layer, lambda x: adapter(x, branch))


def insert_post_ln(
    backbone, modality, layer, adapter: UniAdapterModule, branch, query_residual: bool
) -> None:
    """Post-LN block: y = LN(a + FFN(a)) + A(a) [+ A_m(c) in a layer that ran cross-attention]."""
    stash: dict[str, Tensor] = {}

    def capture_query(_, y: Tensor) -> Tensor:  # self-attention output: the query before cross-attention
        stash["a"] = y
        stash.pop("c", None)  # pragma: no mutate (defensive: add() already pops it every forward)
        return y

    def capture_cross(_, y: Tensor) -> Tensor:  # cross-attention output (fires only in ITM mode)
        stash["c"] = y
        return y

    def capture_ffn_input(x: Tensor) -> Tensor:
        stash["a"] = x
        return x

    def add(_, y: Tensor) -> Tensor:
        a, c = stash.pop("a"), stash.pop("c", None)
        y = y + adapter(a, branch)
        return y if c is None or adapter.cross_branch is None else y + adapter.cross(c)

    if query_residual:
        backbone.hook(modality, layer, "ln_attn", capture_query)
        backbone.hook(modality, layer, "ln_cross", capture_cross)
    else:
        # (any value but "output" selects the input hook: mutants of the literal are equivalent)
        backbone.hook(modality, layer, "fc1", capture_ffn_input, on="input")  # pragma: no mutate
    backbone.hook(modality, layer, "ln_ffn", add)


@register_method("uniadapter")
class UniAdapter(Method):
    config_class = UniAdapterConfig
    identity_at_init = True  # with init="zero" (the default)
    may_skip_params = True  # the cross-modal branch and ITM head rest in ITC-only steps
    acts_in_blocks = True  # towers with blocks share per-step modules; block-less ones are skipped
    modality_options = ("branches",)

    @classmethod
    def attach(cls, model, cfg: UniAdapterConfig):
        check_config(cfg)
        backbone = model.backbone
        mods = cls.modalities(model, cfg)
        branch = cls.branch_map(model, mods, cfg)
        by_step: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for m in mods:
            for i in cls.layers(model, m, cfg):
                by_step[backbone.step_of(m, i)].append((m, i))
        container, shared = nn.ModuleDict({m: nn.ModuleDict() for m in mods}), nn.ModuleDict()
        unshared: set[tuple[str, int]] = set()  # (modality, width) of layers that could not share
        for step in sorted(by_step):
            groups: dict[int, list[tuple[str, int]]] = defaultdict(list)  # width -> members
            for m, i in by_step[step]:
                groups[backbone.encoders[m].dim].append((m, i))
            if len(groups) > 1:
                unshared.update((m, backbone.encoders[m].dim) for m, _ in by_step[step])
            n_shared = sum(len(g) > 1 for g in groups.values())
            for dim, members in groups.items():
                units = [members] if cfg.share and len(members) > 1 else [[x] for x in members]
                for unit in units:
                    crossing = [m for m, i in unit if cfg.cross_modal and has_cross(backbone, m, i)]
                    module = UniAdapterModule(
                        dim,
                        cfg.r,
                        [branch[m] for m, _ in unit],
                        branch[crossing[0]] if crossing else None,
                        cfg.scale,
                        cfg.dropout,
                        cfg.init,
                    )
                    if len(unit) > 1:
                        shared[str(step) if n_shared == 1 else f"{step}_{dim}"] = module
                    else:
                        container[unit[0][0]][str(unit[0][1])] = module
                    for m, i in unit:
                        cls.insert(model, m, i, module, branch[m])
        if cfg.share and unshared:
            widths = ", ".join(f"{m} ({d})" for m, d in sorted(unshared))
            warnings.warn(
                f"uniadapter: encoders of different width cannot share LN_a and the down-projection; "
                f"per-modality down-projections are used where they meet: {widths}",
                stacklevel=2,  # pragma: no mutate (where the warning points)
            )
        if len(shared):
            container["shared"] = shared
        from .uniadapter_blip import maybe_install_blip_head

        maybe_install_blip_head(model, mods, cfg)
        return nn.ModuleDict({k: v for k, v in container.items() if len(v)})

    @classmethod
    def insert(cls, model, m: str, i: int, module: UniAdapterModule, branch: str) -> None:
        if model.backbone.encoders[m].pre_norm:
            insert_parallel(model.backbone, m, i, module, branch)
        else:
            query_residual = has_cross(model.backbone, m, i)
            insert_post_ln(model.backbone, m, i, module, branch, query_residual=query_residual)

    @staticmethod
    def branch_map(model, mods: list[str], cfg: UniAdapterConfig) -> dict[str, str]:
        given = dict(cfg.branches or {})
        unknown = sorted(set(given) - set(mods))
        if unknown:
            raise ValueError(
                f"uniadapter: branches names modalities {unknown} the method does not act on {mods}"
            )
        for m, b in given.items():
            if not isinstance(b, str) or not b or "." in b:
                raise ValueError(
                    f"uniadapter: branch of modality {m!r} must be a name like 'vision', got {b!r}"
                )
        encoders = model.backbone.encoders
        return {m: given.get(m) or default_branch(m, encoders[m].pre_norm) for m in mods}


def has_cross(backbone, modality: str, layer: int) -> bool:
    """Block ``layer`` is a post-LN block with cross-attention (the query residual applies)."""
    enc = backbone.encoders[modality]
    return not enc.pre_norm and "ln_cross" in enc.norms(layer)


def check_config(cfg: UniAdapterConfig) -> None:
    if cfg.r < 1:
        raise ValueError(f"uniadapter: r must be a positive integer, got {cfg.r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"uniadapter: dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.itc_temperature <= 0:
        raise ValueError(f"uniadapter: itc_temperature must be positive, got {cfg.itc_temperature}")
