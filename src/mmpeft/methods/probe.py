"""`probe`: the frozen-feature probe every table needs — a closed-form fit, not gradient descent.

The frozen encoders' pooled features (concatenated over modalities) are standardised with the
training split's mean and std, and a regularised linear model is fitted with scikit-learn:

- classification: multinomial logistic regression (``C = 1 / alpha``);
- multilabel: one logistic regression per label;
- regression: ridge regression;
- retrieval: a ridge map from the first modality's features to the second's (standardised)
  features, ranked by cosine similarity (the ``../shared/data`` reference probe for Flickr8k).

The regularisation strength is chosen from ``alphas`` by the task's primary metric on the
validation split (the same meter and splits as every trained method); with ``train.refit`` the
probe is then refitted on train+val with that strength. The fitted model is written into the
ordinary head (standardisation folded into its weights), so it saves, loads and evaluates like
any adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..registry import register_method
from .base import Method, MethodConfig


@dataclass
class ProbeConfig(MethodConfig):
    solver: Literal["auto", "logistic", "ridge"] = "auto"
    """"auto": logistic regression for classification/multilabel, ridge for regression/retrieval."""
    alphas: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0])
    """Regularisation strengths tried (ridge alpha; logistic C = 1/alpha), chosen on the val split."""
    max_iter: int = 2000
    """Iterations of the logistic-regression solver."""


@register_method("probe")
class ProbeMethod(Method):
    """Fits the default head (or the retrieval projections) in closed form on frozen features."""

    config_class = ProbeConfig
    identity_at_init = True
    closed_form = True

    @classmethod
    def attach(cls, model, cfg: ProbeConfig):
        if cfg.modalities is not None:
            raise ValueError("probe: it uses every modality's pooled features; leave 'modalities' unset")
        if not cfg.alphas or any(a <= 0 for a in cfg.alphas):
            raise ValueError(f"probe: alphas must be positive numbers, got {cfg.alphas}")
        if model.head_config.hidden > 0:
            raise ValueError("probe: it fits a linear head; set model.head.hidden to 0")
        model.probe_config = cfg
        return None


FEATURES = "__features__"


# --- features and targets ---------------------------------------------------------------------
@torch.no_grad()
def collect(trainer, source) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Pooled features per modality (N, D_m) of a split and the head's input (under ``FEATURES``:
    their concatenation, or a fusion method's output), and the split's batches (targets, ids)."""
    from ..train.batches import sequential_batches
    from ..train.evaluation import device_batch, forward_options, split_loader

    model = trainer.model
    model.eval()
    bs = trainer.cfg.eval_batch_size or trainer.cfg.batch_size
    batches = sequential_batches(len(source), bs)
    loader = split_loader(source, batches, model.backbone.encoders, 0, torch.Generator())
    parts: dict[str, list[np.ndarray]] = {}
    kept = []
    for batch in loader:
        batch = device_batch(batch, trainer.accelerator.device)
        # the model's own forward, from raw inputs or cached states, as in training and evaluation
        out = trainer.module(batch["inputs"], **forward_options(batch))
        for key, x in {**model.pooled(out["states"]), FEATURES: out["features"]}.items():
            parts.setdefault(key, []).append(x.float().cpu().numpy().astype(np.float64))
        kept.append({"targets": batch["targets"], "ids": batch["ids"]})
    return {k: np.concatenate(v) for k, v in parts.items()}, kept


def targets_of(task, batches: list[dict], n_out: int) -> np.ndarray:
    """Targets as the task reads them: class indices (N,), 0/1 labels (N, L) or values (N, K)."""
    cpu = torch.device("cpu")
    if task.name in ("classification", "multilabel"):
        return np.concatenate([task.targets(b, n_out, cpu).numpy() for b in batches])
    if task.name == "regression":
        return np.concatenate([task.target_array(b, n_out) for b in batches])
    if task.name == "vqa":  # the answer most annotators gave; -1 where none is in the vocabulary
        scores = np.concatenate([task.soft_scores(b, n_out) for b in batches])
        return np.where(scores.max(1) > 0, scores.argmax(1), -1)
    raise ValueError(
        f"probe: task {task.name!r} is not supported (classification, multilabel, regression, retrieval, vqa)"
    )


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    std = x.std(0)
    return mean, np.where(std > 1e-8, std, 1.0)


def fold(linear: nn.Linear, w: np.ndarray, b: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    """Set ``linear`` so that linear(x) = w @ ((x - mean) / std) + b."""
    w_raw = w / std[None, :]  # (C, D)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(w_raw, dtype=linear.weight.dtype))
        linear.bias.copy_(torch.as_tensor(b - w_raw @ mean, dtype=linear.bias.dtype))


# --- solvers --------------------------------------------------------------------------------------
def fit_logistic(z: np.ndarray, y: np.ndarray, n_classes: int, alpha: float, max_iter: int):
    """Multinomial logistic regression -> (W (C, D), b (C,)); classes absent from y get no mass."""
    from sklearn.linear_model import LogisticRegression

    present = np.unique(y)
    w, b = np.zeros((n_classes, z.shape[1])), np.full(n_classes, -30.0)
    if len(present) == 1:  # nothing to separate: always predict the one class seen
        b[present[0]] = 0.0
        return w, b
    clf = LogisticRegression(C=1.0 / alpha, max_iter=max_iter).fit(z, y)
    if len(present) == 2:  # sklearn keeps one row for two classes: logit(second) - logit(first)
        w[present[1]], b[present[1]] = clf.coef_[0], clf.intercept_[0]
        b[present[0]] = 0.0
    else:
        w[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
    return w, b


def fit_multilabel(z: np.ndarray, y: np.ndarray, alpha: float, max_iter: int):
    w, b = np.zeros((y.shape[1], z.shape[1])), np.zeros(y.shape[1])
    for j in range(y.shape[1]):
        pair_w, pair_b = fit_logistic(z, y[:, j].astype(int), 2, alpha, max_iter)
        w[j], b[j] = pair_w[1] - pair_w[0], pair_b[1] - pair_b[0]
    return w, b


def fit_ridge(z: np.ndarray, y: np.ndarray, alpha: float):
    from sklearn.linear_model import Ridge

    reg = Ridge(alpha=alpha).fit(z, y)
    coef = reg.coef_.reshape(-1, z.shape[1])
    return coef, np.asarray(reg.intercept_, dtype=np.float64).reshape(-1)


# --- fitting into the model -------------------------------------------------------------------
class HeadProbe:
    """Classification / multilabel / regression: the default head is the linear model."""

    def __init__(self, trainer, cfg: ProbeConfig):
        self.trainer, self.cfg = trainer, cfg
        head = trainer.model.peft["head"]
        head = getattr(head, "probe_target", head)  # a wrapper whose logits are one head on the features
        if not isinstance(getattr(head, "net", [None])[-1], nn.Linear) or len(head.net) > 2:
            raise ValueError(
                "probe: it fits a single linear head on the model's features; set model.head.hidden to 0"
                " (pmf: head 'concat')"
            )
        self.linear = head.net[-1]
        self.solver = cfg.solver
        if self.solver == "auto":
            self.solver = "ridge" if trainer.task.name == "regression" else "logistic"

    def data(self, source) -> tuple[np.ndarray, np.ndarray]:
        feats, batches = collect(self.trainer, source)
        y = targets_of(self.trainer.task, batches, self.linear.out_features)
        if self.trainer.task.name == "vqa":  # questions whose answers are all outside the vocabulary
            return feats[FEATURES][y >= 0], y[y >= 0]
        return feats[FEATURES], y

    def fit(self, x: np.ndarray, y: np.ndarray, alpha: float) -> None:
        mean, std = standardise(x)
        z = (x - mean) / std
        task = self.trainer.task.name
        if self.solver == "ridge":
            target = np.eye(self.linear.out_features)[y] if task == "classification" else y
            w, b = fit_ridge(z, target.astype(np.float64), alpha)
        elif task in ("classification", "vqa"):  # vqa: a logistic fit to each question's top answer
            w, b = fit_logistic(z, y, self.linear.out_features, alpha, self.cfg.max_iter)
            if task == "vqa":
                b = b - bce_shift(z, w, b)
        elif task == "multilabel":
            w, b = fit_multilabel(z, y, alpha, self.cfg.max_iter)
        else:
            raise ValueError(f"probe: solver 'logistic' does not fit task {task!r}; use solver 'ridge'")
        fold(self.linear, w, b, mean, std)


def bce_shift(z: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    """The shift c of a softmax fit's logits that minimises the per-answer BCE on the training set.

    vqa trains its head with a sigmoid per answer, and a softmax fit is defined only up to a shift
    that can leave every logit far above 0 (a loss of hundreds at the first step, which wrecks a
    head started at the fit by ``train.head_init: probe``). The BCE of one gold answer per question
    is convex in c with derivative N - sum sigmoid(logits - c): c is where the expected number of
    positive answers equals the N questions (bisection). The argmax is unchanged."""
    logits = z @ w.T + b  # (N, A)
    lo, hi = float(logits.min()) - 50.0, float(logits.max()) + 50.0
    for _ in range(100):
        c = (lo + hi) / 2
        positives = (1.0 / (1.0 + np.exp(np.clip(c - logits, -500, 500)))).sum()
        lo, hi = (c, hi) if positives > len(z) else (lo, c)
    return (lo + hi) / 2


class RetrievalProbe:
    """Retrieval: a ridge map from modality a's features into modality b's standardised space."""

    def __init__(self, trainer, cfg: ProbeConfig):
        self.trainer = trainer
        head = trainer.model.peft["head"]
        self.a, self.b = trainer.task.cfg.modalities
        self.proj = head.proj
        dim_b = trainer.model.backbone.encoders[self.b].dim
        if self.proj[self.b].out_features != dim_b:
            raise ValueError(
                f"probe: retrieval maps {self.a!r} into the feature space of {self.b!r}, so task.embed_dim "
                f"must equal its width {dim_b} (got {self.proj[self.b].out_features})"
            )
        if self.proj[self.a].weight.dim() == 1:
            raise ValueError(
                f"probe: the ridge map needs a full projection for {self.a!r}; take it out of task.diagonal_projection"
            )

    def data(self, source) -> tuple[np.ndarray, np.ndarray]:
        feats, _ = collect(self.trainer, source)
        return feats[self.a], feats[self.b]

    def fit(self, x: np.ndarray, y: np.ndarray, alpha: float) -> None:
        mean_a, std_a = standardise(x)
        mean_b, std_b = standardise(y)
        w, b = fit_ridge((x - mean_a) / std_a, (y - mean_b) / std_b, alpha)
        fold(self.proj[self.a], w, b, mean_a, std_a)
        target = self.proj[self.b]
        if target.weight.dim() == 1:  # a diagonal projection (task.diagonal_projection)
            with torch.no_grad():
                target.weight.copy_(torch.as_tensor(1.0 / std_b, dtype=target.weight.dtype))
                target.bias.copy_(torch.as_tensor(-mean_b / std_b, dtype=target.bias.dtype))
        else:
            fold(target, np.eye(len(mean_b)), np.zeros(len(mean_b)), mean_b, std_b)


def fit_closed_form(trainer) -> list[dict[str, Any]]:
    """The ``probe`` method: fit on train, choose alpha on val (refit on train+val with ``train.refit``)."""
    return select_and_fit(trainer, trainer.model.probe_config, refit=trainer.cfg.refit)


def init_head_from_probe(trainer) -> dict[str, Any]:
    """``train.head_init: probe``: start the head at the probe's solution on the model's features at
    initialisation (linear probing, then fine-tuning: Kumar et al., "Fine-Tuning can Distort
    Pretrained Features and Underperform Out-of-Distribution", ICLR 2022, arXiv 2202.10054)."""
    alphas = trainer.cfg.head_init_alphas or ProbeConfig().alphas
    history = select_and_fit(trainer, ProbeConfig(alphas=list(alphas)), refit=False)
    chosen = next(h for h in history if h["chosen"])
    return {"alpha": chosen["alpha"], "val": chosen["val"]}


def select_and_fit(trainer, cfg: ProbeConfig, refit: bool) -> list[dict[str, Any]]:
    """Fit once per alpha on train and score val; leave the model with the chosen alpha fitted on
    train (train+val when ``refit``). Returns one history record per alpha tried."""
    probe = (RetrievalProbe if trainer.task.name == "retrieval" else HeadProbe)(trainer, cfg)
    train = trainer.caches.get("train", trainer.train_set)
    val = trainer.caches.get("val", trainer.val_set)
    x, y = probe.data(train)
    if val is None and len(cfg.alphas) > 1:
        raise ValueError("probe: choosing among several alphas needs a val split; give one alpha")
    history: list[dict[str, Any]] = [{"epoch": 0, "alpha": cfg.alphas[0], "val": {}}]
    best = 0
    if val is not None:
        history = []
        for i, alpha in enumerate(cfg.alphas):
            probe.fit(x, y, alpha)
            history.append({"epoch": i, "alpha": alpha, "val": trainer._evaluate(val)})
        scores = [h["val"][trainer.task.primary] for h in history]
        best = int(np.nanargmax(scores) if trainer.task.higher_is_better else np.nanargmin(scores))
    if refit and val is not None:
        xv, yv = probe.data(val)
        x, y = np.concatenate([x, xv]), np.concatenate([y, yv])
    probe.fit(x, y, cfg.alphas[best])
    for i, h in enumerate(history):
        h["chosen"] = i == best
    return history
