"""What every method shares: the config base, capabilities and the ``attach`` contract (DESIGN §3).

A method file holds a config dataclass (field docstrings are the CLI help), the ``nn.Module``s
(flat arguments, no config objects) and a registered ``Method`` whose ``attach`` puts modules at
the backbone's attachment points and returns the container stored at ``model.peft[name]``.
Containers are ``ModuleDict``s keyed by modality where a part belongs to one modality, so the
parameter report can split counts per modality; shared parts go under other keys.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from torch import Tensor, nn

from ..config import ConfigError

if TYPE_CHECKING:
    from ..model import MultimodalModel

BlockUse = Literal["", "some", "every"]


@dataclass
class MethodConfig:
    modalities: list[str] | None = None
    """Modalities the method acts on (None: all of the model's)."""
    layers: list[int] | None = None
    """Block indices per encoder the method acts on, negative from the end (None: the method's default)."""


@dataclass(frozen=True)
class TowerInfo:
    """What the block rule needs to know of one encoder, obtainable without building it."""

    family: str
    """Registered encoder type (``timm_cnn``); "" where not known."""
    num_layers: int | None
    """Transformer blocks; None where not known without building the encoder (assumed >= 1)."""


def no_blocks(modality: str, tower: TowerInfo) -> str:
    family = f" ({tower.family})" if tower.family else ""
    return f"encoder {modality!r}{family} has no transformer blocks"


class Method:
    """Base of registered methods. Capabilities switch on generic contract tests.

    The block rule (towers without transformer blocks, e.g. ``timm_cnn`` feature grids), applied
    by ``modalities`` for every method and answered without building anything by ``applicable``:
    a method that ``acts_in_blocks`` skips such a tower with one warning naming it when
    ``modalities`` is None, and is an error when the tower is named in ``modalities`` or when fewer
    towers with blocks than the method needs are left; a method that
    ``needs_blocks_in_every_tower`` (PMF) is an error on any such tower among its modalities.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    identity_at_init: ClassVar[bool] = False
    """The model equals the frozen model before the first optimizer step."""
    min_modalities: ClassVar[int] = 1
    needs_equal_width: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    provides_fusion: ClassVar[bool] = False
    """The method sets the model's fusion (features from all final sequences); one per model."""
    trains_base_weights: ClassVar[bool] = False
    """Unfreezes encoder weights (``full``); every other method trains only ``model.peft``."""
    may_skip_params: ClassVar[bool] = False
    """Some parameters may get no gradient in a step (DDP must look for unused parameters)."""
    acts_in_blocks: ClassVar[bool] = False
    """Acts inside transformer blocks: towers without blocks are skipped (``modalities: None``)."""
    needs_blocks_in_every_tower: ClassVar[bool] = False
    """Cannot leave out a tower of its modalities, so every one of them needs blocks (PMF)."""
    needs_video_tower: ClassVar[bool] = False
    """Acts on the frames of ``video`` towers only (``temporal``, ``temporal_transformer``)."""
    blockless_hint: ClassVar[str] = (
        "use a method on final features instead (linear, late_fusion, lmf, tfn, wander) or full"
    )
    """What to do instead when the block rule leaves the method nothing to act on."""
    missing: ClassVar[str] = (
        "the absent modality's tokens are model.missing's (zeros or a learned placeholder)"
    )
    """How the method treats an example that lacks a modality (``mmpeft.missing``), in words."""
    modality_options: ClassVar[tuple[str, ...]] = ()
    """Config fields that name modalities (a name, a list or a mapping keyed by them); naming a
    skipped tower there is an error like naming it in ``modalities``."""

    @classmethod
    def attach(cls, model: MultimodalModel, cfg: MethodConfig) -> nn.Module | None:
        raise NotImplementedError

    # --- the block rule ----------------------------------------------------------------------
    @classmethod
    def block_use(cls, cfg: MethodConfig) -> BlockUse:
        """How the method uses blocks with ``cfg``: "every" tower it acts on needs them, it acts in
        "some" (those that have them), or not at all ("")."""
        if cls.needs_blocks_in_every_tower:
            return "every"
        return "some" if cls.acts_in_blocks else ""

    @classmethod
    def block_requirement(cls) -> str:
        """What the method needs of the towers' blocks, for ``mmpeft list methods``."""
        return {
            "every": "needs blocks in every tower",
            "some": "acts in blocks (skips towers without)",
            "": "",
        }[cls.block_use(cls.config_class())]

    @classmethod
    def plan_modalities(
        cls, towers: dict[str, TowerInfo], cfg: MethodConfig
    ) -> tuple[list[str], list[str], str | None]:
        """(modalities to act on, towers skipped for having no blocks, why the method cannot
        apply or None). Pure: the same answer for a built model and for a config."""
        names = list(towers) if cfg.modalities is None else list(cfg.modalities)
        unknown = [m for m in names if m not in towers]
        if unknown:
            return names, [], f"no encoder for modality {unknown[0]!r}; have {list(towers)}"
        n = len(cfg.modalities or towers)  # counted as MultimodalModel.attach counts them
        if n < cls.min_modalities:
            return names, [], f"needs at least {cls.min_modalities} modalities, got {n}"
        if cls.needs_video_tower and not any(towers[m].family == "video" for m in names):
            return names, [], f"needs a video tower (type: video) among {names}"
        use = cls.block_use(cfg)
        blockless = [m for m in names if towers[m].num_layers == 0] if use else []
        if blockless and (use == "every" or cfg.modalities is not None):
            m = blockless[0]
            if use == "some":
                return names, [], f"{no_blocks(m, towers[m])} to act in; leave it out of 'modalities'"
            return names, [], f"{no_blocks(m, towers[m])}; {cls.blockless_hint}"
        for option in cls.modality_options if blockless else ():
            value = getattr(cfg, option)  # a name, a list of names or a mapping keyed by them
            named = [value] if isinstance(value, str) else value if isinstance(value, (list, dict)) else []
            m = next((m for m in named if m in blockless), None)
            if m is not None:
                return names, [], f"{no_blocks(m, towers[m])} to act in; leave it out of {option!r}"
        kept = [m for m in names if m not in blockless]
        need = max(cls.min_modalities, 1)
        if blockless and len(kept) < need:
            towers_text = "towers" if need > 1 else "tower"
            left_out = ", ".join(no_blocks(m, towers[m]) for m in blockless)
            why = f"needs {need} {towers_text} with transformer blocks to act in, got {len(kept)}: {left_out}"
            return names, blockless, f"{why}; {cls.blockless_hint}"
        return kept, blockless, None

    @classmethod
    def applicable(
        cls, towers: dict[str, TowerInfo], cfg: MethodConfig | None = None
    ) -> tuple[bool, str | None]:
        """Whether the method can act on these towers under the block rule, and why not."""
        reason = cls.plan_modalities(towers, cfg or cls.config_class())[2]
        return reason is None, reason

    # --- helpers for attach -------------------------------------------------------------------
    @classmethod
    def modalities(cls, model: MultimodalModel, cfg: MethodConfig) -> list[str]:
        """The modalities to act on, after the block rule (see the class docstring)."""
        for m in [] if cfg.modalities is None else cfg.modalities:
            model.backbone._check_modality(m)
        towers = towers_of(model)
        names, skipped, reason = cls.plan_modalities(towers, cfg)
        if reason is not None:
            raise ConfigError(f"{cls.name}: {reason}")
        if skipped:
            left = ", ".join(f"encoder {m!r} has no transformer blocks ({towers[m].family})" for m in skipped)
            warnings.warn(
                f"{cls.name}: {left}; left unadapted, it acts on {names}", UserWarning, stacklevel=3
            )
        return names

    @classmethod
    def layers(cls, model: MultimodalModel, modality: str, cfg: MethodConfig) -> list[int]:
        """Blocks of ``modality`` to act on (``modalities`` has already left out block-less towers
        for methods that declare ``acts_in_blocks``)."""
        if model.backbone.encoders[modality].num_layers == 0:
            tower = towers_of(model)[modality]
            raise ConfigError(
                f"{cls.name}: {no_blocks(modality, tower)} to act in; leave it out of 'modalities'"
            )
        return model.backbone.resolve_layers(modality, cfg.layers)


def encoder_family(encoder: nn.Module) -> str:
    from ..registry import ENCODERS

    return next((name for name, c in ENCODERS.items() if c is type(encoder)), "")


def towers_of(model: MultimodalModel) -> dict[str, TowerInfo]:
    encoders = model.backbone.encoders
    return {m: TowerInfo(encoder_family(e), e.num_layers) for m, e in encoders.items()}


class BlockwiseMethod(Method):
    """A method that attaches one module per (modality, block): ``attach_block`` does the work.

    The container is ``{modality: {layer index: attach_block(...)}}``; a tower skipped for having
    no blocks keeps an empty entry.
    """

    acts_in_blocks = True

    @classmethod
    def attach(cls, model: MultimodalModel, cfg: MethodConfig) -> nn.Module:
        container = nn.ModuleDict()
        mods = cls.modalities(model, cfg)
        for m in model.backbone.modalities if cfg.modalities is None else mods:
            layers = cls.layers(model, m, cfg) if m in mods else []
            container[m] = nn.ModuleDict({str(i): cls.attach_block(model, m, i, cfg) for i in layers})
        return container

    @classmethod
    def attach_block(cls, model: MultimodalModel, modality: str, layer: int, cfg: MethodConfig) -> nn.Module:
        raise NotImplementedError


@dataclass(frozen=True)
class LinearTarget:
    """Where a canonical target lives in a block: the linear to hook and, for a ``q``/``k``/``v``
    target on a fused ``qkv`` projection, the rows of its output that belong to the target."""

    name: str
    rows: slice | None
    in_features: int
    out_features: int  # width of the target's part of the output


def resolve_linear(method: str, modality: str, linears: dict[str, nn.Linear], target: str) -> LinearTarget:
    name, rows = target, None
    if target not in linears and target in ("q", "k", "v") and "qkv" in linears:
        d = linears["qkv"].out_features // 3
        i = "qkv".index(target)
        name, rows = "qkv", slice(i * d, (i + 1) * d)
    if name not in linears:
        raise ValueError(f"{method}: encoder {modality!r} has no linear {target!r}; has {sorted(linears)}")
    lin = linears[name]
    out = lin.out_features if rows is None else rows.stop - rows.start
    return LinearTarget(name, rows, lin.in_features, out)


def add_on_rows(y: Tensor, update: Tensor, rows: slice | None) -> Tensor:
    """y + update, with ``update`` placed on the output ``rows`` of a fused projection."""
    if rows is None:
        return y + update
    full = y.new_zeros((*update.shape[:-1], y.shape[-1]))  # (..., 3D), broadcastable against y
    full[..., rows] = update
    return y + full
