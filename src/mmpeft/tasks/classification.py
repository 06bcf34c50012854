"""`classification`: single-label classification.

Loss: cross-entropy on the head's logits (B, C), with optional label smoothing (Szegedy et al.,
"Rethinking the Inception Architecture for Computer Vision", CVPR 2016, arXiv 1512.00567).
Metrics: accuracy, macro-F1 and support-weighted F1 (scikit-learn ``f1_score``, over the classes
present in targets or predictions). Targets are class indices in [0, C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_task
from .base import ArrayMeter, Meter, Task, TaskConfig, as_int, batch_targets, info_count, logits_of, to_numpy


@dataclass
class ClassificationConfig(TaskConfig):
    num_classes: int = 0
    """Number of classes; 0 takes it from the dataset (``num_classes`` or ``label_names``)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing in [0, 1): the target puts this mass uniformly on all classes."""


def classification_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and weighted F1 of integer predictions against integer targets."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": accuracy_score(target, pred),
        "macro_f1": f1_score(target, pred, average="macro", zero_division=0),
        "weighted_f1": f1_score(target, pred, average="weighted", zero_division=0),
    }


@register_task("classification")
class ClassificationTask(Task):
    config_class = ClassificationConfig
    primary = "accuracy"
    higher_is_better = True

    def __init__(self, cfg: ClassificationConfig):
        super().__init__(cfg)
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ValueError(f"classification: label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        self.classes = cfg.num_classes

    def num_outputs(self, info: dict[str, Any]) -> int:
        self.classes = info_count(info, ("num_classes", "label_names"), self.cfg.num_classes, self.name)
        return self.classes

    def targets(self, batch: dict[str, Any], n: int, device: torch.device) -> Tensor:
        ys = [as_int(t, batch, j, self.name, n) for j, t in enumerate(batch_targets(batch, self.name))]
        return torch.tensor(ys, dtype=torch.long, device=device)  # (B,)

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        logits = logits_of(outputs)  # (B, C)
        y = self.targets(batch, logits.shape[-1], logits.device)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)

    def meter(self) -> Meter:
        def collect(outputs, batch):
            logits = logits_of(outputs)  # (B, C)
            y = self.targets(batch, logits.shape[-1], torch.device("cpu"))
            return {"pred": to_numpy(logits).argmax(-1), "target": y.numpy()}

        return ArrayMeter(collect, lambda a: classification_metrics(a["pred"], a["target"]))
