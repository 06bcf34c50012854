"""`multilabel`: several independent binary labels per example (e.g. MM-IMDB genres).

Loss: binary cross-entropy with logits, averaged over examples and labels. A label is predicted
when its sigmoid probability reaches ``threshold``. Metrics: micro-F1 (pooled over all labels)
and macro-F1 (mean over labels), scikit-learn ``f1_score``; MM-IMDB results are reported this way
since Arevalo et al., "Gated Multimodal Units for Information Fusion", ICLR-W 2017,
arXiv 1702.01992. Targets are multi-hot vectors of length L (a list or array of 0/1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.base import DataError
from ..registry import register_task
from .base import (
    ArrayMeter,
    Meter,
    Task,
    TaskConfig,
    batch_targets,
    example_id,
    info_count,
    logits_of,
    to_numpy,
)


@dataclass
class MultilabelConfig(TaskConfig):
    num_labels: int = 0
    """Number of labels; 0 takes it from the dataset (``num_labels`` or ``label_names``)."""
    threshold: float = 0.5
    """Probability at or above which a label counts as predicted (for the F1 metrics)."""


def multilabel_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 of (N, L) 0/1 predictions against (N, L) 0/1 targets."""
    from sklearn.metrics import f1_score

    return {
        "micro_f1": f1_score(target, pred, average="micro", zero_division=0),
        "macro_f1": f1_score(target, pred, average="macro", zero_division=0),
    }


@register_task("multilabel")
class MultilabelTask(Task):
    config_class = MultilabelConfig
    primary = "micro_f1"
    higher_is_better = True

    def num_outputs(self, info: dict[str, Any]) -> int:
        return info_count(info, ("num_labels", "num_classes", "label_names"), self.cfg.num_labels, self.name)

    def targets(self, batch: dict[str, Any], n: int, device: torch.device) -> Tensor:
        rows = []
        for j, t in enumerate(batch_targets(batch, self.name)):
            row = np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t, dtype=np.float32)
            if row.shape != (n,) or not np.isin(row, (0.0, 1.0)).all():
                raise DataError(
                    f"task {self.name!r}: example {example_id(batch, j)!r} has target {t!r}; "
                    f"expected a multi-hot vector of {n} zeros and ones"
                )
            rows.append(row)
        return torch.from_numpy(np.stack(rows)).to(device)  # (B, L)

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        logits = logits_of(outputs)  # (B, L)
        y = self.targets(batch, logits.shape[-1], logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), y)

    def meter(self) -> Meter:
        def collect(outputs, batch):
            logits = logits_of(outputs)  # (B, L)
            y = self.targets(batch, logits.shape[-1], torch.device("cpu"))
            pred = torch.sigmoid(logits.float()) >= self.cfg.threshold
            return {"pred": to_numpy(pred).astype(np.int64), "target": y.numpy().astype(np.int64)}

        return ArrayMeter(collect, lambda a: multilabel_metrics(a["pred"], a["target"]))
