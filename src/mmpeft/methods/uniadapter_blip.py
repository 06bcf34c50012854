"""The faithful BLIP route of UniAdapter: retrieval head, ITC + ITM losses, ITM re-ranking.

Lu et al., "UniAdapter: Unified Parameter-Efficient Transfer Learning for Cross-modal Modeling",
ICLR 2024, arXiv 2302.06605, built on BLIP (Li et al., ICML 2022, arXiv 2201.12086).

Backbone: the two ``hf_blip`` towers of one Hugging Face ``BlipForImageTextRetrieval``. With the
``uniadapter`` method attached, the shared per-layer adapters sit in the vision blocks (A_v, parallel
to the MLP), the text blocks (A_t after the output LayerNorm) and, when the text tower cross-attends
to image tokens (ITM), the query residual A_t(a) + A_m(c). The method installs the checkpoint's
``vision_proj``, ``text_proj`` and ``itm_head`` as the model's head (trainable, as released).

Functions for trainers and tasks: ``blip_itc_itm_loss`` (or ``..._from_states`` given a forward's
states): in-batch ITC with positives by item id + ITM on one positive and two hard negatives per
item, the released recipe; ``itm_logits`` and
``rerank_with_itm`` (ITM scores of each query's top-k ITC candidates, -100 elsewhere, as the
released evaluation). Not reproduced: the released ITC's momentum encoders, 57,600-entry feature
queue and momentum distillation (alpha 0.4); ITC here is in-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NOT_RANKED = -100.0  # score of candidates outside the top-k (the released evaluation's fill value)


class BlipRetrievalHead(nn.Module):
    """BLIP's projections and ITM head. ``forward`` returns what the ``retrieval`` task's head
    returns: ``{vision: (B, E), text: (B, E) unit-norm ITC embeddings, "logit_scale": 1/T}``."""

    takes_states = True

    def __init__(self, vision_proj, text_proj, itm_head, vision: str, text: str, temperature: float):
        super().__init__()
        self.vision_proj, self.text_proj, self.itm_head = vision_proj, text_proj, itm_head
        self.vision, self.text = vision, text
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, states, backbone=None) -> dict[str, Tensor]:
        image = F.normalize(self.vision_proj(states[self.vision].tokens[:, 0]), dim=-1)  # (B, E)
        text = F.normalize(self.text_proj(states[self.text].tokens[:, 0]), dim=-1)  # (B, E)
        return {self.vision: image, self.text: text, "logit_scale": 1.0 / self.temperature}

    def itc_logits(self, states) -> Tensor:
        out = self(states)
        return out["logit_scale"] * out[self.vision] @ out[self.text].t()  # (B_image, B_text)


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


def install_blip_head(model, temperature: float = 0.07) -> BlipRetrievalHead:
    """Make the checkpoint's ``vision_proj``/``text_proj``/``itm_head`` the model's (trainable) head."""
    pair = blip_towers(model)
    if pair is None:
        raise ValueError("the BLIP head needs an hf_blip vision tower and text tower of one model")
    blip = model.backbone.encoders[pair[0]].blip
    head = BlipRetrievalHead(blip.vision_proj, blip.text_proj, blip.itm_head, *pair, temperature)
    model.set_head(head)
    return head


def maybe_install_blip_head(model, modalities: Sequence[str], cfg) -> None:
    """Called by ``uniadapter.attach``: installs the BLIP head on BLIP towers unless one is set."""
    if cfg.blip_head and "head" not in model.peft and blip_towers(model, modalities) is not None:
        install_blip_head(model, cfg.itc_temperature)


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
    _, t, head = blip_parts(model)
    encoder = model.backbone.encoders[t]
    if first_token is not None:
        ids = text_inputs["input_ids"].clone()
        ids[:, 0] = first_token
        text_inputs = {**text_inputs, "input_ids": ids}
    state = encoder.with_image(encoder.embed(text_inputs), image_tokens, image_pad)
    for i in range(encoder.num_layers):
        state = model.backbone.run_block(t, i, state)
    return head.itm_head(state.tokens[:, 0])  # (B, 2)


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
    n = logits.shape[0]
    positive = same_item(ids, n, logits.device)  # (B, B)
    targets = positive.float() / positive.sum(1, keepdim=True)
    itc = 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.t(), targets))
    out = {"itc": itc, "logits": logits}
    if not itm:
        return {**out, "loss": itc, "itm": torch.zeros_like(itc)}
    with torch.no_grad():
        neg_text = sample_negatives(F.softmax(logits.float(), 1), positive, generator)  # per image
        neg_image = sample_negatives(F.softmax(logits.t().float(), 1), positive, generator)  # per text
    rows = torch.arange(n, device=logits.device)
    text_rows = torch.cat([rows, rows[neg_image >= 0], neg_text[neg_text >= 0]])
    image_rows = torch.cat([rows, neg_image[neg_image >= 0], rows[neg_text >= 0]])
    texts = {k: x[text_rows] if isinstance(x, Tensor) else x for k, x in text_inputs.items()}
    scores = itm_logits(model, states[v].tokens[image_rows], texts, first_token=itm_first_token)
    labels = (torch.arange(len(text_rows), device=logits.device) < n).long()  # positives first
    out["itm"] = F.cross_entropy(scores, labels)
    out["loss"] = itc + out["itm"]
    return out


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


# --- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
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
    device = blip_parts(model)[2].itm_head.weight.device
    scores = []
    for s in range(0, len(image_index), chunk):
        ii, tt = image_index[s : s + chunk].cpu(), text_index[s : s + chunk].cpu()
        texts = {k: x[tt].to(device) for k, x in text_inputs.items()}
        scores.append(itm_logits(model, image_tokens[ii].to(device), texts, first_token=first_token)[:, 1])
    return torch.cat(scores)


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
    n_image, n_text = sims.shape
    if image_tokens.shape[0] != n_image or text_inputs["input_ids"].shape[0] != n_text:
        raise ValueError(
            f"rerank_with_itm: sims is {tuple(sims.shape)} but got {image_tokens.shape[0]} images "
            f"and {text_inputs['input_ids'].shape[0]} texts"
        )
    i2t = rerank_one_side(model, sims, image_tokens, text_inputs, k, beta, chunk, first_token, False)
    t2i = rerank_one_side(model, sims.t(), image_tokens, text_inputs, k, beta, chunk, first_token, True)
    return i2t, t2i


def rerank_one_side(model, sims, image_tokens, text_inputs, k, beta, chunk, first_token, text_query):
    top_sim, top = sims.topk(min(k, sims.shape[1]), dim=1)  # (Q, k)
    queries = torch.arange(sims.shape[0], device=sims.device)[:, None].expand_as(top)  # (Q, k)
    image_index, text_index = (top, queries) if text_query else (queries, top)
    scores = itm_match_scores(
        model, image_tokens, text_inputs, image_index.reshape(-1), text_index.reshape(-1), chunk, first_token
    )
    out = torch.full_like(sims, NOT_RANKED)
    out.scatter_(1, top, scores.view_as(top).to(sims) + beta * top_sim)
    return out
