"""`regression`: one or more real-valued targets (sentiment intensity, ratings).

Loss: L1 (the Wander/MOSI recipe) or MSE. Metrics: MAE, MSE and Pearson r (scipy; averaged over
targets when there are several; NaN when predictions or targets are constant).

With ``sentiment: true`` (one target in [-3, 3], CMU-MOSI/MOSEI) the standard sentiment metrics
are added, following MMSA's ``MetricsTop.__eval_mosei_regression`` (Yu et al., "CH-SIMS: A
Chinese Multimodal Sentiment Analysis Dataset with Fine-grained Annotation of Modality",
ACL 2020; github.com/thuiar/MMSA, src/MMSA/utils/metricsTop.py):

- ``acc2_has0`` / ``f1_has0``: negative (< 0) against non-negative (>= 0), over all examples;
- ``acc2_non0`` / ``f1_non0``: negative (< 0 for targets, <= 0 for predictions) against
  positive (> 0), over the examples whose target is not exactly 0;
- ``acc5`` / ``acc7``: predictions and targets clipped to [-2, 2] / [-3, 3] and rounded to the
  nearest integer (numpy rounding, halves to even), then compared.

The F1 scores are support-weighted binary F1 (scikit-learn ``average="weighted"``), as in MMSA.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.base import DataError
from ..registry import register_task
from .base import ArrayMeter, Meter, Task, TaskConfig, batch_targets, example_id, logits_of, to_numpy


@dataclass
class RegressionConfig(TaskConfig):
    loss: Literal["l1", "mse"] = "l1"
    """Training loss: mean absolute error (``l1``) or mean squared error (``mse``)."""
    num_targets: int = 0
    """Values predicted per example; 0 takes ``num_targets`` from the dataset (default 1)."""
    sentiment: bool = False
    """Add the MOSI/MOSEI sentiment metrics (Acc-2 has0/non0, F1, Acc-5, Acc-7); needs one target."""


def pearson(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson r of two 1-D arrays; NaN when either is constant or there are fewer than 2 values."""
    from scipy.stats import pearsonr

    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(target) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(pearsonr(pred, target)[0])


def sentiment_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MMSA's MOSI/MOSEI metrics of 1-D predictions and targets (see the module docstring)."""
    from sklearn.metrics import accuracy_score, f1_score

    out = {}
    has0_t, has0_p = target >= 0, pred >= 0
    out["acc2_has0"] = accuracy_score(has0_t, has0_p)
    out["f1_has0"] = f1_score(has0_t, has0_p, average="weighted", zero_division=0)
    nz = target != 0
    if nz.any():
        non0_t, non0_p = target[nz] > 0, pred[nz] > 0
        out["acc2_non0"] = accuracy_score(non0_t, non0_p)
        out["f1_non0"] = f1_score(non0_t, non0_p, average="weighted", zero_division=0)
    else:
        out["acc2_non0"] = out["f1_non0"] = float("nan")
    for name, bound in (("acc5", 2.0), ("acc7", 3.0)):
        p, t = np.round(np.clip(pred, -bound, bound)), np.round(np.clip(target, -bound, bound))
        out[name] = float(np.mean(p == t))
    return out


def regression_metrics(pred: np.ndarray, target: np.ndarray, sentiment: bool) -> dict[str, float]:
    """(N, K) predictions and targets -> MAE, MSE, Pearson r (+ sentiment metrics when K = 1)."""
    out = {
        "mae": float(np.mean(np.abs(pred - target))),
        "mse": float(np.mean((pred - target) ** 2)),
        "pearson": float(np.mean([pearson(pred[:, k], target[:, k]) for k in range(pred.shape[1])])),
    }
    if sentiment:
        out.update(sentiment_metrics(pred[:, 0], target[:, 0]))
    return out


@register_task("regression")
class RegressionTask(Task):
    config_class = RegressionConfig
    primary = "mae"
    higher_is_better = False

    def __init__(self, cfg: RegressionConfig):
        super().__init__(cfg)
        if cfg.sentiment and cfg.num_targets > 1:
            raise ValueError("regression: sentiment metrics need num_targets = 1")

    def num_outputs(self, info: dict[str, Any]) -> int:
        n = self.cfg.num_targets or int(info.get("num_targets", 1))
        if self.cfg.sentiment and n != 1:
            raise ValueError(f"regression: sentiment metrics need one target, the dataset has {n}")
        return n

    def target_array(self, batch: dict[str, Any], k: int) -> np.ndarray:
        """(B, K) float64 targets; a missing, non-finite or wrongly sized target is a DataError."""
        rows = []
        for j, t in enumerate(batch_targets(batch, self.name)):
            row = np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t, dtype=np.float64).reshape(-1)
            if row.shape != (k,) or not np.isfinite(row).all():
                raise DataError(
                    f"task {self.name!r}: example {example_id(batch, j)!r} has target {t!r}; "
                    f"expected {k} finite number(s)"
                )
            rows.append(row)
        return np.stack(rows)  # (B, K)

    def predictions(self, outputs: dict[str, Any]) -> Tensor:
        logits = logits_of(outputs)
        return logits.float().reshape(logits.shape[0], -1)  # (B, K)

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        pred = self.predictions(outputs)  # (B, K)
        y = torch.tensor(self.target_array(batch, pred.shape[1]), dtype=pred.dtype, device=pred.device)
        return F.l1_loss(pred, y) if self.cfg.loss == "l1" else F.mse_loss(pred, y)

    def meter(self) -> Meter:
        def collect(outputs, batch):
            pred = self.predictions(outputs)  # (B, K)
            return {
                "pred": to_numpy(pred).astype(np.float64),
                "target": self.target_array(batch, pred.shape[1]),
            }

        return ArrayMeter(collect, lambda a: regression_metrics(a["pred"], a["target"], self.cfg.sentiment))
