"""The task interface (DESIGN §4): loss, head size, and a metric accumulator.

``Task.prepare(model, info)`` runs once after the model is built (a retrieval task installs its
per-modality projection head there). During training ``loss(outputs, batch)`` gets the model's
output dict and the collated batch (``targets`` as a list, converted by the task). Evaluation
uses ``meter = task.meter(); meter.update(outputs, batch); meter.compute() -> {name: float}``.
``primary`` names the metric used for model selection and early stopping, ``higher_is_better``
its direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor


@dataclass
class TaskConfig:
    pass


class Meter:
    def update(self, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class Task:
    name: ClassVar[str] = ""
    config_class: ClassVar[type[TaskConfig]] = TaskConfig
    primary: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True

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
