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
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from ..model import MultimodalModel


@dataclass
class MethodConfig:
    modalities: list[str] | None = None
    """Modalities the method acts on (None: all of the model's)."""
    layers: list[int] | None = None
    """Block indices per encoder the method acts on, negative from the end (None: the method's default)."""


class Method:
    """Base of registered methods. Capabilities switch on generic contract tests."""

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

    @classmethod
    def attach(cls, model: MultimodalModel, cfg: MethodConfig) -> nn.Module | None:
        raise NotImplementedError

    # --- helpers for attach -------------------------------------------------------------------
    @staticmethod
    def modalities(model: MultimodalModel, cfg: MethodConfig) -> list[str]:
        names = model.backbone.modalities if cfg.modalities is None else list(cfg.modalities)
        for m in names:
            model.backbone._check_modality(m)
        return names

    @classmethod
    def layers(cls, model: MultimodalModel, modality: str, cfg: MethodConfig) -> list[int]:
        """Blocks of ``modality`` to act on. A tower without blocks (a CNN feature grid) is an error
        when named explicitly, and is skipped with a warning when implied by ``modalities: None``."""
        if model.backbone.encoders[modality].num_layers == 0:
            message = f"method {cls.name!r}: encoder {modality!r} has no transformer blocks to act in"
            if cfg.modalities is not None:
                raise ValueError(message + "; leave it out of 'modalities'")
            warnings.warn(message + "; it is left unadapted", stacklevel=2)
            return []
        return model.backbone.resolve_layers(modality, cfg.layers)


class BlockwiseMethod(Method):
    """A method that attaches one module per (modality, block): ``attach_block`` does the work.

    The container is ``{modality: {layer index: attach_block(...)}}``.
    """

    @classmethod
    def attach(cls, model: MultimodalModel, cfg: MethodConfig) -> nn.Module:
        container = nn.ModuleDict()
        for m in cls.modalities(model, cfg):
            container[m] = nn.ModuleDict(
                {str(i): cls.attach_block(model, m, i, cfg) for i in cls.layers(model, m, cfg)}
            )
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
