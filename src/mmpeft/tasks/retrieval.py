"""`retrieval`: cross-modal retrieval between two modalities (image-text, audio-image, ...).

``prepare`` installs a head that projects each of the two modalities' pooled features to a
shared space and L2-normalises them (``takes_states=True``: it returns
``{modality_a: (B, E), modality_b: (B, E), "logit_scale": ()}`` as the model's ``logits``).

Loss: the symmetric image-text contrastive (ITC/InfoNCE) loss with a learnable temperature of
CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021, arXiv 2103.00020). Positives are defined by item id, as in ALBEF/BLIP's ITC
(Li et al., ICML 2022, arXiv 2201.12086): two captions of the same image in one batch are both
positives, with the target mass shared among them. Under ``torch.distributed`` the embeddings
of all processes are gathered (with gradient) so the loss sees the global batch.

Metrics: recall@K in both directions (a query is a hit when any of its positives ranks in the
top K; ties count in the query's favour), their mean (``mean_recall``) and ``rsum``, the sum of
the recalls in percent as papers report it (at most 600 for K = 1, 5, 10). The gallery keeps
one item per id for the modalities in ``gallery_by_id`` (the image of five caption examples
is one gallery image).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import gather_rows
from ..registry import register_task
from .base import ArrayMeter, Meter, Task, TaskConfig, to_numpy


@dataclass
class RetrievalConfig(TaskConfig):
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    """The two modalities retrieved from each other."""
    embed_dim: int = 256
    """Width of the shared embedding space of the projection head."""
    temperature: float = 0.07
    """Initial softmax temperature of the contrastive loss (CLIP's 0.07)."""
    learn_temperature: bool = True
    """Train the temperature (as a log-scale in the head) or keep it fixed."""
    max_logit_scale: float = 100.0
    """Upper clamp on 1/temperature (CLIP's 100)."""
    gallery_by_id: list[str] | None = None
    """Modalities whose gallery keeps one item per id (None: the first of ``modalities``; [] keeps all)."""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Cut-offs K of the recall@K metrics."""
    gather: bool = True
    """Under torch.distributed, compute the loss over the embeddings of all processes."""


class RetrievalHead(nn.Module):
    """Per-modality linear projection of pooled features, L2-normalised; owns the logit scale."""

    takes_states = True

    def __init__(
        self, dims: dict[str, int], embed_dim: int, temperature: float, learn: bool, max_scale: float
    ):
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Linear(d, embed_dim) for m, d in dims.items()})
        init = torch.tensor(math.log(1.0 / temperature))
        if learn:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.max_log_scale = math.log(max_scale)

    def forward(self, states, backbone) -> dict[str, Tensor]:
        out = {}
        for m, proj in self.proj.items():
            pooled = backbone.encoders[m].pool(states[m])  # (B, D_m)
            out[m] = F.normalize(proj(pooled), dim=-1)  # (B, E)
        out["logit_scale"] = self.logit_scale.clamp(max=self.max_log_scale).exp()  # ()
        return out


def id_keys(ids: list[Any] | None, n: int, device: torch.device) -> Tensor:
    """Item ids -> (n,) int64 keys, equal exactly when the ids are (stable across processes)."""
    if ids is None or len(ids) != n or any(i is None for i in ids):
        return torch.arange(n, device=device)  # no ids: every example is its own item
    keys = [
        int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") >> 1 for i in ids
    ]
    return torch.tensor(keys, dtype=torch.long, device=device)


def contrastive_loss(a: Tensor, b: Tensor, keys: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of (N, E) embeddings; rows with equal keys are positives of each other."""
    logits = scale * a.float() @ b.float().T  # (N, N)
    pos = (keys[:, None] == keys[None, :]).float()  # (N, N)
    target = pos / pos.sum(1, keepdim=True)  # each row's target mass, shared among its positives
    loss_ab = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_ba = -(target.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (loss_ab + loss_ba) / 2


def positive_ranks(
    query: np.ndarray, gallery: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray
) -> np.ndarray:
    """Per query, how many gallery items score strictly above its best positive (0 = top hit)."""
    ranks = np.empty(len(query), dtype=np.int64)
    for s in range(0, len(query), 1024):  # blocks keep the (b, G) score matrix small
        sim = query[s : s + 1024] @ gallery.T  # (b, G)
        pos = q_ids[s : s + 1024, None] == g_ids[None, :]  # (b, G)
        best = np.where(pos, sim, -np.inf).max(axis=1)  # (b,)  -inf: no positive, never a hit
        ranks[s : s + 1024] = (sim > best[:, None]).sum(axis=1)
    return ranks


def retrieval_metrics(
    emb: dict[str, np.ndarray], ids: list[Any], dedupe: list[str], ks: list[int]
) -> dict[str, float]:
    """Recall@K both ways between the two modalities of ``emb`` ({m: (N, E)}), positives by id."""
    codes: dict[Any, int] = {}
    idx = np.array([codes.setdefault(i, len(codes)) for i in ids], dtype=np.int64)  # (N,)
    galleries = {}
    for m, x in emb.items():
        if m in dedupe:
            _, first = np.unique(idx, return_index=True)  # first example of each id
            galleries[m] = (x[first], idx[first])
        else:
            galleries[m] = (x, idx)
    (ma, (xa, ia)), (mb, (xb, ib)) = galleries.items()
    out = {}
    for q, (xq, iq), g, (xg, ig) in ((ma, (xa, ia), mb, (xb, ib)), (mb, (xb, ib), ma, (xa, ia))):
        ranks = positive_ranks(xq, xg, iq, ig)
        for k in ks:
            out[f"{q}_to_{g}_r{k}"] = float(np.mean(ranks < k))
    recalls = list(out.values())
    out["mean_recall"] = float(np.mean(recalls))
    out["rsum"] = 100.0 * float(np.sum(recalls))
    return out


@register_task("retrieval")
class RetrievalTask(Task):
    config_class = RetrievalConfig
    primary = "rsum"
    higher_is_better = True

    def __init__(self, cfg: RetrievalConfig):
        super().__init__(cfg)
        if len(cfg.modalities) != 2 or cfg.modalities[0] == cfg.modalities[1]:
            raise ValueError(
                f"retrieval: modalities must name two different modalities, got {cfg.modalities}"
            )
        if cfg.temperature <= 0 or cfg.max_logit_scale <= 0:
            raise ValueError("retrieval: temperature and max_logit_scale must be positive")
        self.dedupe = cfg.modalities[:1] if cfg.gallery_by_id is None else list(cfg.gallery_by_id)
        unknown = [m for m in self.dedupe if m not in cfg.modalities]
        if unknown:
            raise ValueError(f"retrieval: gallery_by_id names {unknown}, not one of {cfg.modalities}")

    def num_outputs(self, info: dict[str, Any]) -> int:
        return 0  # the task installs its own head in prepare()

    def prepare(self, model, info: dict[str, Any]) -> None:
        encoders = model.backbone.encoders
        missing = [m for m in self.cfg.modalities if m not in encoders]
        if missing:
            raise ValueError(f"retrieval: the model has no encoder for {missing}; it has {sorted(encoders)}")
        head = model.peft["head"] if "head" in model.peft else None
        if getattr(head, "takes_states", False):  # a method installed its own retrieval head (BLIP)
            return
        dims = {m: encoders[m].dim for m in self.cfg.modalities}
        c = self.cfg
        model.set_head(
            RetrievalHead(dims, c.embed_dim, c.temperature, c.learn_temperature, c.max_logit_scale)
        )

    def embeddings(self, outputs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        emb = outputs["logits"]
        if not isinstance(emb, dict) or any(m not in emb for m in self.cfg.modalities):
            raise ValueError(
                "retrieval: the model's logits must be the retrieval head's {modality: embedding} dict; "
                "was task.prepare(model, info) called?"
            )
        a, b = (emb[m] for m in self.cfg.modalities)
        return a, b, emb.get("logit_scale", torch.tensor(1.0 / self.cfg.temperature, device=a.device))

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        a, b, scale = self.embeddings(outputs)  # (B, E), (B, E), ()
        keys = id_keys(batch.get("ids"), a.shape[0], a.device)  # (B,)
        if self.cfg.gather:
            a, b, keys = gather_rows(a), gather_rows(b), gather_rows(keys)  # (N, E), (N, E), (N,)
        return contrastive_loss(a, b, keys, scale)

    def meter(self) -> Meter:
        ma, mb = self.cfg.modalities

        def collect(outputs, batch):
            a, b, _ = self.embeddings(outputs)
            ids = batch.get("ids")
            if ids is None or len(ids) != a.shape[0] or any(i is None for i in ids):
                raise ValueError("retrieval: every example needs an item 'id' (positives are defined by id)")
            return {ma: to_numpy(a), mb: to_numpy(b), "ids": np.array(ids, dtype=object)}

        def finish(arrays):
            emb = {ma: arrays[ma], mb: arrays[mb]}
            return retrieval_metrics(emb, list(arrays["ids"]), self.dedupe, self.cfg.ks)

        return ArrayMeter(collect, finish)
