"""The task interface (DESIGN §4): loss, head size, and a metric accumulator.

``Task.prepare(model, info)`` runs once after the model is built (a retrieval task installs its
per-modality projection head there). During training ``loss(outputs, batch)`` gets the model's
output dict and the collated batch (``targets`` as a list, converted by the task). Evaluation
uses ``meter = task.meter(); meter.update(outputs, batch); meter.compute() -> {name: float}``.
``primary`` names the metric used for model selection and early stopping, ``higher_is_better``
its direction.

Meters keep every example's prediction and target (as numpy arrays on the CPU) and compute
the metrics once at the end, so metrics that do not decompose over batches (F1, Pearson r,
recall@K) are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..data.base import DataError


@dataclass
class TaskConfig:
    pass


class Meter:
    wants_reference = False
    """True for a meter whose metrics also need the model's outputs on the training split (the
    retrieval task's hubness correction ranks against that reference bank): ``evaluate`` then
    runs the split through ``reference_meter()`` first and hands it over with ``set_reference``."""

    def bind_model(self, model) -> None:
        """Called once before evaluation with the (unwrapped) model, for meters that need it
        (e.g. ITM re-ranking); nothing by default."""

    def reference_meter(self) -> Meter:
        raise NotImplementedError(f"{type(self).__name__} needs no reference split")

    def set_reference(self, meter: Meter) -> None:
        raise NotImplementedError(f"{type(self).__name__} needs no reference split")

    def update(self, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class Task:
    name: ClassVar[str] = ""
    config_class: ClassVar[type[TaskConfig]] = TaskConfig
    primary: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    two_towers: ClassVar[bool] = False
    """Embeds each modality on its own (retrieval): a fusion of all modalities has nothing to feed."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    def num_outputs(self, info: dict[str, Any]) -> int:
        """Head outputs the task needs, given the reader's ``info()`` (0: the task installs its own head)."""
        raise NotImplementedError

    def prepare(self, model, info: dict[str, Any]) -> None:
        """Hook to install task-specific heads; nothing by default."""

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def meter(self) -> Meter:
        raise NotImplementedError


def build_task(name: str, options: dict | None = None, where: str = "task") -> Task:
    """Registered task ``name`` built from a plain options dict (validated: unknown keys are errors)."""
    from ..config import ConfigError, from_dict
    from ..registry import TASKS

    try:
        cls = TASKS.get(name)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None
    return cls(from_dict(cls.config_class, options, where=f"{where} ({name})"))


# --- helpers shared by the tasks ------------------------------------------------------------------
def info_count(info: dict[str, Any], keys: tuple[str, ...], override: int, task: str) -> int:
    """A class/label/answer count: the config override, else the first of ``keys`` in ``info``
    (a list counts by its length)."""
    if override > 0:
        return override
    for key in keys:
        value = info.get(key)
        if value is not None:
            return len(value) if isinstance(value, (list, tuple)) else int(value)
    raise ValueError(
        f"task {task!r}: the dataset info has none of {list(keys)}; set the count in the task options"
    )


def example_id(batch: dict[str, Any], j: int) -> Any:
    ids = batch.get("ids") or []
    return ids[j] if j < len(ids) else j


def batch_targets(batch: dict[str, Any], task: str) -> list[Any]:
    """The batch's targets as a list; a missing target is a DataError naming the example."""
    targets = batch.get("targets")
    if targets is None:
        raise DataError(f"task {task!r}: the batch has no 'targets'")
    if isinstance(targets, Tensor):
        targets = list(targets)
    for j, t in enumerate(targets):
        if t is None:
            raise DataError(f"task {task!r}: example {example_id(batch, j)!r} has no target")
    return list(targets)


def as_int(value: Any, batch: dict[str, Any], j: int, task: str, n: int) -> int:
    """One class index in [0, n); anything else is a DataError naming the example."""
    if getattr(value, "ndim", None) == 0:  # numpy scalar or 0-d tensor/array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= int(value) < n:
        raise DataError(
            f"task {task!r}: example {example_id(batch, j)!r} has target {value!r}; "
            f"expected a class index in [0, {n})"
        )
    return int(value)


def logits_of(outputs: dict[str, Any]) -> Tensor:
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    if not isinstance(logits, Tensor):
        raise TypeError(f"expected the model's 'logits' to be a tensor, got {type(logits).__name__}")
    return logits


def to_numpy(x: Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


class ArrayMeter(Meter):
    """Collects named per-example arrays over batches and computes metrics at the end.

    ``collect(outputs, batch) -> {name: (B, ...) array}``; ``finish({name: (N, ...) array}) -> metrics``.
    """

    def __init__(
        self,
        collect: Callable[[dict[str, Any], dict[str, Any]], dict[str, np.ndarray]],
        finish: Callable[[dict[str, np.ndarray]], dict[str, float]],
    ):
        self.collect = collect
        self.finish = finish
        self.parts: dict[str, list[np.ndarray]] = {}

    def update(self, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        with torch.no_grad():
            for key, value in self.collect(outputs, batch).items():
                self.parts.setdefault(key, []).append(np.asarray(value))

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything collected so far, {name: (N, ...)}."""
        if not self.parts:
            raise ValueError("meter.compute() called before any update()")
        return {k: np.concatenate(v, axis=0) for k, v in self.parts.items()}

    def compute(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.finish(self.arrays()).items()}
