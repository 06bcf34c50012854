"""`vqa`: visual question answering as classification over an answer vocabulary.

Each answer a gets the soft VQA score min(#annotators who gave a / 3, 1) (Antol et al., "VQA:
Visual Question Answering", ICCV 2015, arXiv 1505.00468). Loss: binary cross-entropy of the
logits (B, A) against these soft scores, summed over answers and averaged over questions (the
recipe of Teney et al., "Tips and Tricks for Visual Question Answering", CVPR 2018,
arXiv 1708.02711). Metric: VQA accuracy, the mean soft score of each question's top answer.
(The official evaluation also averages over 10-choose-9 annotator subsets and normalises answer
strings; answers here are already vocabulary entries.)

A target is one of: a list of the annotators' answers (indices, or strings of the vocabulary
``info["answers"]`` / ``info["label_names"]``), a mapping answer -> count, or a single answer
index (score 1). Answers outside the vocabulary (unknown strings, ``None``, -1) score nowhere.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
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
class VQAConfig(TaskConfig):
    num_answers: int = 0
    """Size of the answer vocabulary; 0 takes it from the dataset (``num_answers``, ``answers``,
    ``num_classes`` or ``label_names``)."""
    humans_for_full_score: int = 3
    """Annotators who must give an answer for it to score 1 (VQA: 3)."""


def _plain(a: Any) -> Any:
    return a.item() if getattr(a, "ndim", None) == 0 else a  # numpy/torch scalar -> Python


def answer_counts(target: Any) -> Counter:
    """A target in any accepted form -> Counter {answer: annotators}."""
    if isinstance(target, dict):
        return Counter({_plain(a): float(c) for a, c in target.items()})
    if isinstance(target, (list, tuple, np.ndarray)) and getattr(target, "ndim", 1) == 1:
        return Counter(_plain(a) for a in target)
    target = _plain(target)
    if isinstance(target, int | str) and not isinstance(target, bool):
        return Counter({target: float("inf")})  # a single gold answer: full score
    raise TypeError(f"unsupported VQA target {target!r}")


@register_task("vqa")
class VQATask(Task):
    config_class = VQAConfig
    primary = "vqa_accuracy"
    higher_is_better = True

    def __init__(self, cfg: VQAConfig):
        super().__init__(cfg)
        self.vocab: dict[str, int] = {}

    def num_outputs(self, info: dict[str, Any]) -> int:
        names = info.get("answers") or info.get("label_names") or []
        self.vocab = {str(a): i for i, a in enumerate(names)}
        keys = ("num_answers", "answers", "num_classes", "label_names")
        return info_count(info, keys, self.cfg.num_answers, self.name)

    def prepare(self, model, info: dict[str, Any]) -> None:
        if not self.vocab:
            self.num_outputs(info)

    def soft_scores(self, batch: dict[str, Any], n: int) -> np.ndarray:
        """(B, A) soft VQA scores min(count / humans_for_full_score, 1)."""
        scores = np.zeros((len(batch_targets(batch, self.name)), n), dtype=np.float64)
        for j, t in enumerate(batch_targets(batch, self.name)):
            try:
                counts = answer_counts(t)
            except TypeError as e:
                raise DataError(f"task {self.name!r}: example {example_id(batch, j)!r}: {e}") from None
            for answer, count in counts.items():
                k = self.vocab.get(answer, -1) if isinstance(answer, str) else answer
                if isinstance(k, int) and not isinstance(k, bool) and 0 <= k < n:
                    scores[j, k] = min(count / self.cfg.humans_for_full_score, 1.0)
                elif isinstance(answer, int) and not isinstance(answer, bool) and answer >= n:
                    raise DataError(
                        f"task {self.name!r}: example {example_id(batch, j)!r} has answer index {answer}, "
                        f"but the vocabulary has {n} answers"
                    )
        return scores

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        logits = logits_of(outputs).float()  # (B, A)
        target = torch.from_numpy(self.soft_scores(batch, logits.shape[-1])).to(logits.device, logits.dtype)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return bce.sum(-1).mean()

    def meter(self) -> Meter:
        def collect(outputs, batch):
            logits = logits_of(outputs)  # (B, A)
            scores = self.soft_scores(batch, logits.shape[-1])
            top = to_numpy(logits).argmax(-1)  # (B,)
            return {"score": scores[np.arange(len(top)), top]}

        return ArrayMeter(collect, lambda a: {"vqa_accuracy": float(np.mean(a["score"]))})
