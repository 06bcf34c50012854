"""The faithful BLIP route of UniAdapter: retrieval head, ITC + ITM losses, ITM re-ranking.

Lu et al., "UniAdapter: Unified Parameter-Efficient Transfer Learning for Cross-modal Modeling",
ICLR 2024, arXiv 2302.06605, built on BLIP (Li et al., ICML 2022, arXiv 2201.12086).

Backbone: the two ``hf_blip`` towers of one Hugging Face ``BlipForImageTextRetrieval``. With the
``uniadapter`` method attached, the shared per-layer adapters sit in the vision blocks (A_v, parallel
to the MLP), the text blocks (A_t after the output LayerNorm) and, when the text tower cross-attends
to image tokens (ITM), the query residual A_t(a) + A_m(c). The method installs the checkpoint's
``vision_proj``, ``text_proj`` and ``itm_head`` as the model's head (trainable, as released).

The ``retrieval`` task drives the head: with ``head.itm`` on, a training forward also returns ITM
logits of one positive and two hard negatives per example (``itm_logits``, ``itm_labels``), so ITM
runs inside the model's forward (DDP sees every parameter it uses); ``head.rerank`` re-scores each
query's top-k ITC candidates by ITM at evaluation (the task's ``rerank_k``).

Functions for custom loops: ``blip_itc_itm_loss`` (or ``..._from_states`` given a forward's
states): in-batch ITC with positives by item id + ITM on one positive and two hard negatives per
item, the released recipe; ``itm_logits`` and ``rerank_with_itm`` (ITM scores of each query's top-k
ITC candidates, -100 elsewhere, as the released evaluation). Not reproduced: the released ITC's
momentum encoders, 57,600-entry feature queue and momentum distillation (alpha 0.4); ITC here is
in-batch, and hard negatives are drawn within each process's batch (the released Flickr30k setting;
its COCO setting draws them across all processes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..encoders.video import BLIP_POOLS_FRAMES, rows_per_example

NOT_RANKED = -100.0  # score of candidates outside the top-k (the released evaluation's fill value)
FRAME_TEMPERATURE = 4.0  # frame-aware attention: softmax over frames of similarity / 4 (released med.py)


class BlipRetrievalHead(nn.Module):
    """BLIP's projections and ITM head. ``forward`` returns what the ``retrieval`` task's head
    returns: ``{vision: (B, E), text: (B, E) unit-norm ITC embeddings, "logit_scale": 1/T}``, plus
    ``itm_logits`` (P, 2) and ``itm_labels`` (P,) in training mode when ``itm`` is on."""

    takes_states = True
    takes_batch = True  # forward also gets the raw inputs and the item ids (ITM on hard negatives)
    supports_itm = True
    pools_frames = True  # a video tower's frames are pooled here, not by the tower's ``pool``

    def __init__(
        self,
        vision_proj,
        text_proj,
        itm_head,
        vision: str,
        text: str,
        temperature: float,
        frames: int = 1,
        frame_aware: bool = True,
    ):
        super().__init__()
        self.vision_proj, self.text_proj, self.itm_head = vision_proj, text_proj, itm_head
        self.vision, self.text = vision, text
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.itm = False  # set by the retrieval task (option ``itm``): ITM logits in training forwards
        self.itm_first_token: int | None = None  # BLIP's [ENC] id for ITM passes (None: ids as given)
        self.frames = frames  # a video vision tower: its final states are N frames' tokens, (B, N·T, D)
        self.frame_aware = frame_aware  # video ITM: frame-aware attention (uniadapter's option)

    @property
    def itm_modalities(self) -> tuple[str, str]:
        """(modality whose final states ITM cross-attends to, modality whose raw inputs it encodes)."""
        return self.vision, self.text

    def vision_embeddings(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Final vision states (B, N·T, D) -> (ITC embedding (B, E), per-frame embeddings (B, N, E)):
        each frame's [CLS] projected, and the projection of their mean (the released video feature)."""
        B, NT, D = tokens.shape
        cls = tokens.reshape(B, self.frames, NT // self.frames, D)[:, :, 0]  # (B, N, D)
        frames = F.normalize(self.vision_proj(cls), dim=-1)
        return F.normalize(self.vision_proj(cls.mean(1)), dim=-1), frames

    def key_scale(self, text_emb: Tensor, image_tokens: Tensor) -> Tensor | None:
        """Frame-aware attention's scale of each image token's cross-attention key (P, N·T) for the
        pairs (text_emb[p], image_tokens[p]), or None (images, or ``frame_aware`` off)."""
        if self.frames == 1 or not self.frame_aware:
            return None
        tokens_per_frame = image_tokens.shape[1] // self.frames
        return frame_key_scale(text_emb, self.vision_embeddings(image_tokens)[1], tokens_per_frame)

    def forward(self, states, backbone=None, inputs=None, ids=None) -> dict[str, Tensor]:
        image = self.vision_embeddings(states[self.vision].tokens)[0]  # (B, E)
        text = F.normalize(self.text_proj(states[self.text].tokens[:, 0]), dim=-1)  # (B, E)
        out = {self.vision: image, self.text: text, "logit_scale": 1.0 / self.temperature}
        if self.itm and self.training:
            if inputs is None or backbone is None:
                raise ValueError(
                    "BLIP ITM training needs the raw text inputs, but the forward continued from cached "
                    "states; set train.prefix_cache=false (or task.itm=false)"
                )
            logits = out["logit_scale"] * image @ text.t()  # (B_image, B_text)
            keys = torch.arange(len(image), device=image.device) if ids is None else ids
            positive = same_item(keys, len(image), image.device)  # (B, B)
            image_rows, text_rows, labels = hard_negative_pairs(logits, positive)
            texts = take_rows(inputs[self.text], text_rows)
            image_tokens = states[self.vision].tokens[image_rows]  # (P, N, D_v)
            scale = self.key_scale(text[text_rows], image_tokens)
            out["itm_logits"] = run_itm(
                backbone, self, image_tokens, texts, first_token=self.itm_first_token, key_scale=scale
            )
            out["itm_labels"] = labels  # (P,)
        return out

    def itc_logits(self, states) -> Tensor:
        out = self(states)
        return out["logit_scale"] * out[self.vision] @ out[self.text].t()  # (B_image, B_text)

    @torch.no_grad()
    def rerank(
        self,
        backbone,
        sims: Tensor,
        image_tokens: Tensor,
        text_inputs: dict,
        k: int,
        chunk: int = 64,
        text_emb: Tensor | None = None,
    ):
        """ITM re-ranking for evaluation: (i2t (N_image, N_text), t2i (N_text, N_image)) with ITM match
        logits on each query's top-k ITC candidates and, below them, the rest in ITC order.
        ``text_emb`` (N_text, E): the texts' ITC embeddings, which frame-aware attention needs."""
        check_rerank_shapes(sims, image_tokens, text_inputs)
        args = (backbone, self, image_tokens, text_inputs, k, 0.0, chunk, self.itm_first_token)
        return (
            rerank_one_side(sims, *args, False, True, text_emb),
            rerank_one_side(sims.t(), *args, True, True, text_emb),
        )


# --- finding the BLIP parts ---------------------------------------------------------------------
def blip_towers(model, modalities: Sequence[str] | None = None) -> tuple[str, str] | None:
    """(vision modality, text modality) of two ``hf_blip`` towers of one model, or None."""
    encoders = model.backbone.encoders
    names = list(modalities or encoders)
    for v in names:
        if getattr(encoders[v], "blip_tower", "") != "vision":
            continue
        for t in names:
            enc = encoders[t]
            if getattr(enc, "blip_tower", "") == "text" and enc.blip is encoders[v].blip:
                return v, t
    return None


def install_blip_head(model, temperature: float = 0.07, frame_aware: bool = True) -> BlipRetrievalHead:
    """Make the checkpoint's ``vision_proj``/``text_proj``/``itm_head`` the model's (trainable) head."""
    pair = blip_towers(model)
    if pair is None:
        raise ValueError("the BLIP head needs an hf_blip vision tower and text tower of one model")
    vision = model.backbone.encoders[pair[0]]
    blip = vision.blip
    frames = rows_per_example(vision)  # a video tower over BLIP's vision tower: N
    if getattr(vision, "frame_mixer", None) is not None:
        raise ValueError(f"the BLIP head: {BLIP_POOLS_FRAMES}")
    head = BlipRetrievalHead(
        blip.vision_proj, blip.text_proj, blip.itm_head, *pair, temperature, frames, frame_aware
    )
    model.set_head(head)
    return head


def maybe_install_blip_head(model, modalities: Sequence[str], cfg) -> None:
    """Called by ``uniadapter.attach``: installs the BLIP head on BLIP towers unless one is set."""
    if cfg.blip_head and "head" not in model.peft and blip_towers(model, modalities) is not None:
        install_blip_head(model, cfg.itc_temperature, cfg.frame_aware)


def blip_parts(model) -> tuple[str, str, BlipRetrievalHead]:
    pair = blip_towers(model)
    head = model.peft["head"] if "head" in model.peft else None
    if pair is None or not isinstance(head, BlipRetrievalHead):
        raise ValueError(
            "ITC/ITM need hf_blip vision and text towers of one model and the BLIP head "
            "(attach 'uniadapter' with blip_head=True, or call install_blip_head(model))"
        )
    return pair[0], pair[1], head


# --- ITM -----------------------------------------------------------------------------------------
def run_itm(
    backbone,
    head,
    image_tokens: Tensor,
    text_inputs: dict,
    image_pad: Tensor | None = None,
    first_token=None,
    key_scale: Tensor | None = None,
) -> Tensor:
    """ITM logits (B, 2) (column 1: match) of text i cross-attending to image tokens i (B, N, D_v);
    ``key_scale`` (B, N) scales the image tokens' keys (frame-aware attention)."""
    encoder = backbone.encoders[head.text]
    if first_token is not None:
        ids = text_inputs["input_ids"].clone()
        ids[:, 0] = first_token
        text_inputs = {**text_inputs, "input_ids": ids}
    state = encoder.with_image(encoder.embed(text_inputs), image_tokens, image_pad, key_scale)
    for i in range(encoder.num_layers):
        state = backbone.run_block(head.text, i, state)
    return head.itm_head(state.tokens[:, 0])  # (B, 2)


def itm_logits(
    model,
    image_tokens: Tensor,
    text_inputs: dict[str, Tensor],
    image_pad: Tensor | None = None,
    first_token: int | None = None,
) -> Tensor:
    """ITM logits (B, 2) (column 1: match) of text i cross-attending to image tokens i (B, N, D_v).

    ``first_token`` replaces the first text token (BLIP's released code uses its [ENC] token for ITM;
    the HF forward keeps the ids as given)."""
    return run_itm(model.backbone, blip_parts(model)[2], image_tokens, text_inputs, image_pad, first_token)


@torch.no_grad()
def frame_key_scale(text_emb: Tensor, frame_emb: Tensor, tokens_per_frame: int) -> Tensor:
    """UniAdapter's frame-aware attention (the released models/med.py): with s (P, N) the cosine of
    each text to each of its video's frames, the keys of frame n's patch tokens are multiplied by
    N · softmax_n(s / 4); each frame's [CLS] key stays. A weighting, not a parameter: no gradient.
    text_emb (P, E) and frame_emb (P, N, E) unit-norm -> (P, N·T) key scales, T = tokens per frame."""
    P, N, _ = frame_emb.shape
    sim = torch.einsum("pe,pne->pn", text_emb.float(), frame_emb.float())  # (P, N)
    weight = torch.softmax(sim / FRAME_TEMPERATURE, dim=1) * N  # (P, N)
    scale = weight[:, :, None].expand(P, N, tokens_per_frame).clone()  # (P, N, T)
    scale[:, :, 0] = 1.0  # the frame's [CLS]
    return scale.reshape(P, N * tokens_per_frame)


def same_item(ids: Sequence[Any] | Tensor, n: int, device) -> Tensor:
    """(B, B) bool, True where two examples share an item id (the ITC positives)."""
    if len(ids) != n:
        raise ValueError(f"ITC: got {len(ids)} item ids for a batch of {n}")
    if isinstance(ids, Tensor):
        key = ids.reshape(-1).to(device)
    else:
        codes: dict[Any, int] = {}
        key = torch.tensor([codes.setdefault(x, len(codes)) for x in ids], device=device)
    return key[:, None] == key[None, :]


def sample_negatives(weights: Tensor, positive: Tensor, generator=None) -> Tensor:
    """One hard negative per row, drawn by ``weights`` (B, B) among non-positives; -1 where none."""
    allowed = ~positive
    has = allowed.any(1)  # (B,)
    w = torch.where(allowed, weights.clamp_min(1e-12), torch.zeros_like(weights))
    w[~has] = 1.0  # placeholder rows, discarded below
    picked = torch.multinomial(w, 1, generator=generator).squeeze(1)  # (B,)
    return torch.where(has, picked, torch.full_like(picked, -1))


@torch.no_grad()
def hard_negative_pairs(logits: Tensor, positive: Tensor, generator=None) -> tuple[Tensor, Tensor, Tensor]:
    """BLIP's ITM pairs from ITC logits (B_image, B_text): every positive pair (i, i), a negative text
    per image and a negative image per text drawn by ITC softmax. -> (image rows, text rows, labels)."""
    n = logits.shape[0]
    neg_text = sample_negatives(F.softmax(logits.float(), 1), positive, generator)  # per image
    neg_image = sample_negatives(F.softmax(logits.t().float(), 1), positive, generator)  # per text
    rows = torch.arange(n, device=logits.device)
    text_rows = torch.cat([rows, rows[neg_image >= 0], neg_text[neg_text >= 0]])  # (P,)
    image_rows = torch.cat([rows, neg_image[neg_image >= 0], rows[neg_text >= 0]])  # (P,)
    labels = (torch.arange(len(text_rows), device=logits.device) < n).long()  # positives first
    return image_rows, text_rows, labels


def take_rows(inputs: dict[str, Any], rows: Tensor) -> dict[str, Any]:
    return {k: x[rows] if isinstance(x, Tensor) else x for k, x in inputs.items()}


def blip_itc_itm_loss(
    model,
    inputs: dict[str, Any],
    ids: Sequence[Any] | Tensor,
    itm: bool = True,
    itm_first_token: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """UniAdapter's retrieval objective: {"loss": itc + itm, "itc", "itm", "logits" (B, B)}."""
    states = model.backbone(inputs)
    text = blip_parts(model)[1]
    return blip_itc_itm_loss_from_states(model, states, inputs[text], ids, itm, itm_first_token, generator)


def blip_itc_itm_loss_from_states(
    model,
    states,
    text_inputs: dict[str, Any],
    ids: Sequence[Any] | Tensor,
    itm: bool = True,
    itm_first_token: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The same from the final states of a forward (``outputs["states"]``) and the text inputs."""
    v, _, head = blip_parts(model)
    logits = head.itc_logits(states)  # (B_image, B_text), row i and column i belong to example i
    positive = same_item(ids, logits.shape[0], logits.device)  # (B, B)
    targets = positive.float() / positive.sum(1, keepdim=True)
    itc = 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.t(), targets))
    out = {"itc": itc, "logits": logits}
    if not itm:
        return {**out, "loss": itc, "itm": torch.zeros_like(itc)}
    image_rows, text_rows, labels = hard_negative_pairs(logits, positive, generator)
    texts = take_rows(text_inputs, text_rows)
    scores = itm_logits(model, states[v].tokens[image_rows], texts, first_token=itm_first_token)
    out["itm"] = F.cross_entropy(scores, labels)
    out["loss"] = itc + out["itm"]
    return out


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


# --- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def match_scores(
    backbone,
    head,
    image_tokens,
    text_inputs,
    image_index,
    text_index,
    chunk=64,
    first_token=None,
    text_emb=None,
):
    """ITM match logits of the pairs (image_index[j], text_index[j]), ``chunk`` pairs per pass: (P,).
    ``text_emb`` (N_text, E): ITC embeddings of the texts, for a video head's frame-aware attention."""
    device = head.itm_head.weight.device
    scores = []
    for s in range(0, len(image_index), chunk):
        ii, tt = image_index[s : s + chunk].cpu(), text_index[s : s + chunk].cpu()
        texts = {k: x[tt].to(device) for k, x in text_inputs.items()}
        images = image_tokens[ii].to(device)
        scale = None if text_emb is None else head.key_scale(text_emb[tt].to(device), images)
        logits = run_itm(backbone, head, images, texts, first_token=first_token, key_scale=scale)
        scores.append(logits[:, 1].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def itm_match_scores(
    model,
    image_tokens: Tensor,
    text_inputs: dict[str, Tensor],
    image_index: Tensor,
    text_index: Tensor,
    chunk: int = 64,
    first_token: int | None = None,
) -> Tensor:
    """ITM match logits of the pairs (image_index[j], text_index[j]), ``chunk`` pairs per pass: (P,)."""
    head = blip_parts(model)[2]
    return match_scores(
        model.backbone, head, image_tokens, text_inputs, image_index, text_index, chunk, first_token
    )


def check_rerank_shapes(sims: Tensor, image_tokens: Tensor, text_inputs: dict) -> None:
    n_image, n_text = sims.shape
    if image_tokens.shape[0] != n_image or text_inputs["input_ids"].shape[0] != n_text:
        raise ValueError(
            f"ITM re-ranking: sims is {tuple(sims.shape)} but got {image_tokens.shape[0]} images "
            f"and {text_inputs['input_ids'].shape[0]} texts"
        )


@torch.no_grad()
def rerank_with_itm(
    model,
    sims: Tensor,
    image_tokens: Tensor,
    text_inputs: dict[str, Tensor],
    k: int = 256,
    beta: float = 0.0,
    chunk: int = 64,
    first_token: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Re-rank each query's top-k ITC candidates by ITM (the released evaluation, k_test = 256).

    sims: (N_image, N_text) ITC similarities; image_tokens: (N_image, N, D_v) final vision states;
    text_inputs: the text tower's inputs for all N_text texts. Returns (i2t (N_image, N_text),
    t2i (N_text, N_image)): ITM match logit + beta * ITC similarity on the top-k, -100 elsewhere."""
    check_rerank_shapes(sims, image_tokens, text_inputs)
    args = (model.backbone, blip_parts(model)[2], image_tokens, text_inputs, k, beta, chunk, first_token)
    return rerank_one_side(sims, *args, False, False), rerank_one_side(sims.t(), *args, True, False)


def rerank_one_side(
    sims,
    backbone,
    head,
    image_tokens,
    text_inputs,
    k,
    beta,
    chunk,
    first_token,
    text_query,
    tail,
    text_emb=None,
):
    """One direction; ``tail``: the candidates below the top-k keep their ITC order (else -100)."""
    top_sim, top = sims.topk(min(k, sims.shape[1]), dim=1)  # (Q, k)
    queries = torch.arange(sims.shape[0], device=sims.device)[:, None].expand_as(top)  # (Q, k)
    image_index, text_index = (top, queries) if text_query else (queries, top)
    scores = (
        match_scores(
            backbone,
            head,
            image_tokens,
            text_inputs,
            image_index.reshape(-1),
            text_index.reshape(-1),
            chunk,
            first_token,
            text_emb,
        )
        .view_as(top)
        .to(sims)
        + beta * top_sim
    )  # (Q, k)
    if tail:  # shift the ITC scores of the rest below each row's lowest re-ranked score
        floor = scores.min(1, keepdim=True).values - 1.0  # (Q, 1)
        out = sims - sims.max(1, keepdim=True).values + floor  # (Q, G)
    else:
        out = torch.full_like(sims, NOT_RANKED)
    return out.scatter_(1, top, scores)
