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

Cross-encoder heads (BLIP's, installed by ``uniadapter`` on ``hf_blip`` towers; a head with
``supports_itm``): the loss adds image-text matching (ITM) on one positive and two hard negatives
per example, sampled from the in-batch ITC similarities (Li et al., BLIP, arXiv 2201.12086), which
the head computes inside the model's forward (``itm_logits``, ``itm_labels``). With ``rerank_k`` > 0
evaluation re-ranks each query's top-k ITC candidates by the head's ITM score (``head.rerank``);
candidates below the top k keep their ITC order.

Hubness: a linear map between two embedding spaces (a ridge map, a projection head trained on a few
hundred pairs) makes "hubs", items close to most queries, which then crowd every top-1. With
``hubness: csls`` ranking uses cross-domain similarity local scaling (Conneau et al., "Word
Translation Without Parallel Data", ICLR 2018, arXiv 1710.04087): 2 cos(q, g) - r(q) - r(g), with
r(x) the mean cosine of x to its ``hubness_k`` nearest neighbours of the other modality. The
neighbours come from a reference bank, the model's embeddings of the training split (the split the
model was fitted on, train+val after a refit), so no evaluated item informs another's score: the
querybank idea of Bogolin et al., "Cross Modal Retrieval with Querybank Normalisation", CVPR 2022,
arXiv 2112.12777. ``evaluate`` supplies the bank (``Meter.wants_reference``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

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
    itm: bool | None = None
    """Add the image-text matching loss on hard negatives (BLIP's ITM). None: when the model's head has
    an ITM head (BLIP towers with uniadapter's BLIP head); True: require one; False: ITC only."""
    itm_weight: float = 1.0
    """Weight of the ITM loss: loss = ITC + itm_weight * ITM (BLIP/UniAdapter: 1)."""
    rerank_k: int = 0
    """Evaluate by re-ranking each query's top-k ITC candidates with ITM scores (the released
    UniAdapter/BLIP evaluation: 256 on COCO, 128 on Flickr30k); 0 ranks by ITC only."""
    rerank_batch_size: int = 128
    """Image-text pairs per ITM pass when re-ranking."""
    hubness: Literal["none", "csls"] = "none"
    """Ranking scores: "none" ranks by cosine; "csls" by 2 cos(q, g) - r(q) - r(g) with r the mean
    cosine to the hubness_k nearest items of the other modality in the training split (see above)."""
    hubness_k: int = 10
    """Neighbours in the reference bank that measure an item's hubness (Conneau et al.: 10)."""
    diagonal_projection: list[str] = field(default_factory=list)
    """Modalities whose projection is a per-feature scale and shift instead of a full matrix (their
    width must equal ``embed_dim``): the ridge map's target side is only a standardisation, so a
    diagonal holds it exactly with 2·D parameters instead of D² + D."""


class DiagonalLinear(nn.Module):
    """y = weight * x + bias, per feature (a linear map restricted to the diagonal)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_features = self.out_features = dim
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight + self.bias


def projection(dim: int, embed_dim: int, diagonal: bool) -> nn.Module:
    if not diagonal:
        return nn.Linear(dim, embed_dim)
    if dim != embed_dim:
        raise ValueError(
            f"retrieval: a diagonal projection keeps the width, so embed_dim must be {dim} (got {embed_dim})"
        )
    return DiagonalLinear(dim)


class RetrievalHead(nn.Module):
    """Per-modality linear projection of pooled features, L2-normalised; owns the logit scale."""

    takes_states = True

    def __init__(
        self,
        dims: dict[str, int],
        embed_dim: int,
        temperature: float,
        learn: bool,
        max_scale: float,
        diagonal: tuple[str, ...] = (),
    ):
        super().__init__()
        self.proj = nn.ModuleDict({m: projection(d, embed_dim, m in diagonal) for m, d in dims.items()})
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


def ranks_from_scores(sim: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray) -> np.ndarray:
    """Scores (Q, G) -> per query, how many gallery items score strictly above its best positive."""
    pos = q_ids[:, None] == g_ids[None, :]  # (Q, G)
    best = np.where(pos, sim, -np.inf).max(axis=1)  # (Q,)  -inf: no positive, never a hit
    return (sim > best[:, None]).sum(axis=1)


def positive_ranks(
    query: np.ndarray,
    gallery: np.ndarray,
    q_ids: np.ndarray,
    g_ids: np.ndarray,
    hubness: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Per query, how many gallery items score strictly above its best positive (0 = top hit).
    ``hubness`` = (r of each query (Q,), r of each gallery item (G,)): rank by CSLS instead."""
    ranks = np.empty(len(query), dtype=np.int64)
    for s in range(0, len(query), 1024):  # blocks keep the (b, G) score matrix small
        sim = query[s : s + 1024] @ gallery.T  # (b, G)
        if hubness is not None:
            r_q, r_g = hubness
            sim = 2 * sim - r_q[s : s + 1024, None] - r_g[None, :]
        ranks[s : s + 1024] = ranks_from_scores(sim, q_ids[s : s + 1024], g_ids)
    return ranks


def neighbour_similarity(x: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """(N,) the mean cosine of each row of ``x`` to its ``k`` most similar rows of ``bank``."""
    k = min(k, len(bank))
    out = np.empty(len(x), dtype=np.float64)
    for s in range(0, len(x), 1024):
        sim = x[s : s + 1024] @ bank.T  # (b, N_bank)
        out[s : s + 1024] = np.partition(sim, -k, axis=1)[:, -k:].mean(axis=1)
    return out


def gallery_rows(ids: list[Any], modalities: list[str], dedupe: list[str]):
    """(id codes (N,), {modality: example rows of its gallery}): the first example of each id for
    the modalities in ``dedupe``, every example otherwise."""
    codes: dict[Any, int] = {}
    idx = np.array([codes.setdefault(i, len(codes)) for i in ids], dtype=np.int64)  # (N,)
    first = np.unique(idx, return_index=True)[1]  # increasing: ids in order of first appearance
    return idx, {m: first if m in dedupe else np.arange(len(idx)) for m in modalities}


def recall_metrics(ranks: dict[str, np.ndarray], ks: list[int]) -> dict[str, float]:
    """{"a_to_b": per-query ranks} -> recall@K per direction, ``mean_recall`` and ``rsum``."""
    out = {f"{name}_r{k}": float(np.mean(r < k)) for name, r in ranks.items() for k in ks}
    recalls = list(out.values())
    out["mean_recall"] = float(np.mean(recalls))
    out["rsum"] = 100.0 * float(np.sum(recalls))
    return out


def retrieval_metrics(
    emb: dict[str, np.ndarray],
    ids: list[Any],
    dedupe: list[str],
    ks: list[int],
    bank: dict[str, np.ndarray] | None = None,
    hubness_k: int = 10,
) -> dict[str, float]:
    """Recall@K both ways between the two modalities of ``emb`` ({m: (N, E)}), positives by id.
    With a reference ``bank`` ({m: (N_m, E)}) the ranking is by CSLS against it."""
    (ma, xa), (mb, xb) = emb.items()
    idx, rows = gallery_rows(ids, [ma, mb], dedupe)
    a, b = xa[rows[ma]], xb[rows[mb]]
    hub_ab = hub_ba = None
    if bank is not None:
        r_a = neighbour_similarity(a, bank[mb], hubness_k)  # how close each a sits to the b's
        r_b = neighbour_similarity(b, bank[ma], hubness_k)
        hub_ab, hub_ba = (r_a, r_b), (r_b, r_a)
    ranks = {
        f"{ma}_to_{mb}": positive_ranks(a, b, idx[rows[ma]], idx[rows[mb]], hub_ab),
        f"{mb}_to_{ma}": positive_ranks(b, a, idx[rows[mb]], idx[rows[ma]], hub_ba),
    }
    return recall_metrics(ranks, ks)


@register_task("retrieval")
class RetrievalTask(Task):
    config_class = RetrievalConfig
    primary = "rsum"
    higher_is_better = True
    two_towers = True

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
        unknown = [m for m in cfg.diagonal_projection if m not in cfg.modalities]
        if unknown:
            raise ValueError(f"retrieval: diagonal_projection names {unknown}, not one of {cfg.modalities}")
        if cfg.itm_weight < 0 or cfg.rerank_k < 0 or cfg.rerank_batch_size <= 0:
            raise ValueError("retrieval: itm_weight and rerank_k must be >= 0, rerank_batch_size > 0")
        if cfg.hubness_k < 1:
            raise ValueError(f"retrieval: hubness_k must be >= 1, got {cfg.hubness_k}")
        if cfg.hubness != "none" and cfg.rerank_k > 0:
            raise ValueError(
                "retrieval: hubness corrects ITC ranking; it cannot be combined with rerank_k > 0"
            )

    def num_outputs(self, info: dict[str, Any]) -> int:
        return 0  # the task installs its own head in prepare()

    def prepare(self, model, info: dict[str, Any]) -> None:
        encoders = model.backbone.encoders
        missing = [m for m in self.cfg.modalities if m not in encoders]
        if missing:
            raise ValueError(f"retrieval: the model has no encoder for {missing}; it has {sorted(encoders)}")
        from ..methods.applicability import task_reason

        for key, method in model.methods.items():  # a fusion's parameters would never get a gradient
            reason = task_reason(method, self.name)
            if reason is not None:
                raise ValueError(
                    f"retrieval: method {key!r} {reason}; use linear, probe or a method inside the towers"
                )
        head = model.peft["head"] if "head" in model.peft else None
        if not getattr(head, "takes_states", False):  # else a method installed its own head (BLIP)
            dims = {m: encoders[m].dim for m in self.cfg.modalities}
            c = self.cfg
            head = RetrievalHead(
                dims,
                c.embed_dim,
                c.temperature,
                c.learn_temperature,
                c.max_logit_scale,
                tuple(c.diagonal_projection),
            )
            model.set_head(head)
        self.configure_itm(head)

    def configure_itm(self, head: nn.Module) -> None:
        """Switch the head's ITM loss on or off (``itm``); check that ``itm``/``rerank_k`` can be had."""
        c = self.cfg
        if not getattr(head, "supports_itm", False):
            if c.itm or c.rerank_k > 0:
                raise ValueError(
                    f"retrieval: itm={c.itm}, rerank_k={c.rerank_k} need a head with an ITM cross-encoder "
                    f"(hf_blip towers with uniadapter's BLIP head); this model's head is {type(head).__name__}"
                )
            return
        if sorted(head.itm_modalities) != sorted(c.modalities):
            raise ValueError(
                f"retrieval: modalities {c.modalities} differ from the ITM head's {list(head.itm_modalities)}"
            )
        head.itm = c.itm is not False

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
        loss = contrastive_loss(a, b, keys, scale)
        logits = outputs["logits"]
        if "itm_logits" in logits and self.cfg.itm is not False:  # (P, 2): a cross-encoder head, training
            loss = loss + self.cfg.itm_weight * F.cross_entropy(
                logits["itm_logits"].float(), logits["itm_labels"]
            )
        return loss

    def batch_ids(self, batch: dict[str, Any], n: int) -> list[Any]:
        ids = batch.get("ids")
        if ids is None or len(ids) != n or any(i is None for i in ids):
            raise ValueError("retrieval: every example needs an item 'id' (positives are defined by id)")
        return list(ids)

    def meter(self) -> Meter:
        if self.cfg.rerank_k > 0:
            return RerankMeter(self)
        return EmbeddingMeter(self, hubness=self.cfg.hubness != "none")


class EmbeddingMeter(ArrayMeter):
    """Recall@K of the ITC embeddings; with ``hubness`` the scores are CSLS against the training
    split's embeddings, which ``evaluate`` collects with ``reference_meter()``."""

    def __init__(self, task: RetrievalTask, hubness: bool = False):
        super().__init__(self.embeddings, self.metrics)
        self.task = task
        self.wants_reference = hubness
        self.bank: dict[str, np.ndarray] | None = None

    def embeddings(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, np.ndarray]:
        a, b, _ = self.task.embeddings(outputs)
        ids = self.task.batch_ids(batch, a.shape[0])
        ma, mb = self.task.cfg.modalities
        return {ma: to_numpy(a), mb: to_numpy(b), "ids": np.array(ids, dtype=object)}

    def reference_meter(self) -> EmbeddingMeter:
        return EmbeddingMeter(self.task)

    def set_reference(self, meter: Meter) -> None:
        """The bank: ``meter``'s embeddings, one per id for the modalities kept by id."""
        arrays = meter.arrays()
        modalities = self.task.cfg.modalities
        _, rows = gallery_rows(list(arrays["ids"]), modalities, self.task.dedupe)
        self.bank = {m: arrays[m][rows[m]] for m in modalities}

    def metrics(self, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        if self.wants_reference and self.bank is None:
            raise ValueError(
                "retrieval: hubness 'csls' ranks against the training split's embeddings; "
                "evaluate(..., reference=<training split>) must supply them"
            )
        ma, mb = self.task.cfg.modalities
        emb = {ma: arrays[ma], mb: arrays[mb]}
        cfg = self.task.cfg
        return retrieval_metrics(emb, list(arrays["ids"]), self.task.dedupe, cfg.ks, self.bank, cfg.hubness_k)


class RerankMeter(Meter):
    """Recall@K after re-ranking each query's top-k ITC candidates by the head's ITM scores.

    Keeps the ITC embeddings, the final states of the head's image modality (one per id when that
    gallery is by id) and the raw text inputs; ``compute`` runs the bound model's ITM passes."""

    def __init__(self, task: RetrievalTask):
        self.task = task
        self.model = None
        self.emb: dict[str, list[np.ndarray]] = {m: [] for m in task.cfg.modalities}
        self.ids: list[Any] = []
        self.image_tokens: list[Tensor] = []
        self.texts: list[dict[str, Tensor]] = []
        self.seen: set = set()

    def bind_model(self, model) -> None:
        self.model = model

    def head(self):
        if self.model is None:
            raise ValueError("retrieval: ITM re-ranking needs the model; call meter.bind_model(model) first")
        return self.model.peft["head"]

    @torch.no_grad()
    def update(self, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        image, text = self.head().itm_modalities
        a, b, _ = self.task.embeddings(outputs)
        ids = self.task.batch_ids(batch, a.shape[0])
        raw = batch["inputs"][text]
        if not isinstance(raw, dict) or "input_ids" not in raw:
            raise ValueError(
                f"retrieval: ITM re-ranking needs the raw {text!r} inputs, got cached states; "
                "set train.prefix_cache=false"
            )
        for m, x in zip(self.task.cfg.modalities, (a, b), strict=True):
            self.emb[m].append(to_numpy(x))
        keep = []  # rows of this batch in the image gallery (the first example of each id when by id)
        for j, i in enumerate(ids):
            if image not in self.task.dedupe or i not in self.seen:
                keep.append(j)
                self.seen.add(i)
        self.ids += ids
        self.image_tokens.append(outputs["states"][image].tokens[keep].cpu())  # (b, N, D)
        self.texts.append({k: x.cpu() for k, x in raw.items() if isinstance(x, Tensor)})

    def compute(self) -> dict[str, float]:
        if not self.ids:
            raise ValueError("meter.compute() called before any update()")
        head, cfg = self.head(), self.task.cfg
        image, text = head.itm_modalities
        emb = {m: np.concatenate(parts) for m, parts in self.emb.items()}
        idx, rows = gallery_rows(self.ids, cfg.modalities, self.task.dedupe)
        ri, rt = rows[image], rows[text]
        sims = torch.from_numpy(emb[image][ri] @ emb[text][rt].T)  # (N_image, N_text) cosine
        texts = {k: v[torch.from_numpy(rt)] for k, v in pad_cat(self.texts).items()}
        i2t, t2i = head.rerank(
            self.model.backbone,
            sims,
            torch.cat(self.image_tokens),
            texts,
            cfg.rerank_k,
            cfg.rerank_batch_size,
            text_emb=torch.from_numpy(emb[text][rt]),
        )
        ranks = {
            f"{image}_to_{text}": ranks_from_scores(i2t.float().numpy(), idx[ri], idx[rt]),
            f"{text}_to_{image}": ranks_from_scores(t2i.float().numpy(), idx[rt], idx[ri]),
        }
        ma, mb = cfg.modalities  # the metric names in the order of the ITC-only meter
        return recall_metrics({n: ranks[n] for n in (f"{ma}_to_{mb}", f"{mb}_to_{ma}")}, cfg.ks)


def pad_cat(batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-batch (b, T_j) token tensors -> (N, max T), right-padded with zeros (masked positions)."""
    T = max(x.shape[1] for batch in batches for x in batch.values())
    return {k: torch.cat([F.pad(b[k], (0, T - b[k].shape[1])) for b in batches]) for k in batches[0]}
