"""Which registered methods can act on a model config, answered without loading weights.

The answer follows the block rule of ``Method`` (towers without transformer blocks, such as
``timm_cnn`` feature grids) and each method's ``min_modalities``, through the same
``Method.plan_modalities`` that ``attach`` runs, so the two agree.

How the number of blocks of a tower is known: an encoder family whose block count is fixed
declares it as a class attribute (``timm_cnn``: ``num_layers = 0``) and is judged from the config
alone. For every other family the count depends on its weights or config; by default such a tower
is taken to have blocks (every other family is a transformer), which is exact unless a config asks
for zero layers. ``build=True`` builds the encoders instead (random weights from ``config``, cheap
for toy and tiny configs; a ``path`` loads its weights) and reads their ``num_layers``.
"""

from __future__ import annotations

from ..registry import ENCODERS, METHODS, TASKS
from .base import MethodConfig, TowerInfo


def static_num_layers(family: str) -> int | None:
    """Blocks of every encoder of a family, where the family class fixes it; else None."""
    n = getattr(ENCODERS.get(family), "num_layers", None)
    return n if isinstance(n, int) else None


def tower_infos(model_config: dict, build: bool = False) -> dict[str, TowerInfo]:
    """Modality -> ``TowerInfo`` of a model config (``{encoders, methods, head}``)."""
    from ..model import build_encoder, validate_model_spec

    _, encoders, _, _ = validate_model_spec(model_config)
    if build:
        return {m: TowerInfo(s.type, build_encoder(m, s).num_layers) for m, s in encoders.items()}
    return {m: TowerInfo(s.type, static_num_layers(s.type)) for m, s in encoders.items()}


def task_reason(method, task: str | None) -> str | None:
    """Why ``method`` cannot serve the registered task named ``task`` (None: it can, or unknown)."""
    if task in TASKS and TASKS.get(task).two_towers and method.provides_fusion:
        return (
            f"fuses all modalities into one feature, but {task} embeds each modality on its own (two towers)"
        )
    return None


def applicable_methods(
    model_config: dict, build: bool = False, task: str | None = None
) -> dict[str, str | None]:
    """Registered method name -> None where it can act on the config's encoders, else the reason.

    A method listed in ``model_config["methods"]`` is judged with its options there (the first
    entry of that name), any other with its default options. ``build``: see the module docstring.
    ``task``: the run's task name, where known (retrieval rules out the fusion methods).
    """
    from ..model import validate_model_spec

    _, _, entries, _ = validate_model_spec(model_config)
    configured: dict[str, MethodConfig] = {}
    for _key, method, cfg in entries:
        configured.setdefault(method.name, cfg)
    towers = tower_infos(model_config, build)
    out = {}
    for name, method in METHODS.items():
        cfg = configured.get(name) or method.config_class()
        out[name] = task_reason(method, task) or method.applicable(towers, cfg)[1]
    return out


def check_applicable(model_config: dict, task: str | None = None) -> list[str]:
    """One line "key: not applicable: reason" per configured method that cannot act (no build)."""
    from ..model import validate_model_spec

    _, _, entries, _ = validate_model_spec(model_config)
    towers = tower_infos(model_config)
    lines = []
    for key, method, cfg in entries:
        reason = task_reason(method, task) or method.applicable(towers, cfg)[1]
        if reason is not None:
            lines.append(f"{key}: not applicable: {reason}")
    return lines
