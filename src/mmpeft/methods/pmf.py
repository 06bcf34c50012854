"""`pmf`: prompt-based multimodal fusion in the last K layers of frozen unimodal transformers.

Li et al., "Efficient Multimodal Fusion via Interactive Prompting", CVPR 2023, arXiv 2304.06306.

The encoders run unimodally (no prompts, no autograd graph) up to the last K layers, aligned
from the end. Each fusion layer runs every frozen block twice. Query stage, per ordered pair
(a -> b): Z = layer_a([X_a; QCP_ab; QP_ab]), keep its last M_q rows and map them to b's width
with an MLP (d_a -> h -> d_b). Fusion stage, per target b:
X_b = layer_b([X_b; FCP_b; mapped queries from every a != b])[:, :T_b]. Prompts are appended
after the tokens without position embeddings and are always attendable. With two modalities
this is exactly the paper; with more it is the ordered-pair generalisation. The head is one
linear head per modality on its pooled (CLS) feature with the logits averaged, or one head on
the concatenated features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..encoders.base import EncoderState
from ..encoders.video import refuse_frame_batches
from ..heads import MLPHead
from ..missing import absent_rows, present_weights
from ..registry import register_method
from .base import Method, MethodConfig


@dataclass
class PMFConfig(MethodConfig):
    num_fusion_layers: int = 2
    """K: fusion layers, the last K blocks of every encoder (aligned from the end)."""
    num_qp: int = 4
    """M_q: query prompts per ordered pair of modalities."""
    num_qcp: int = 4
    """M_qc: query-context prompts per ordered pair."""
    num_fcp: int = 4
    """M_fc: fusion-context prompts per modality."""
    mlp_hidden: int | None = None
    """Hidden width h of the mapping MLPs; None means max(width) / 2."""
    train_fcp: bool = True
    """Train the fusion-context prompts; False reproduces the released code (frozen random FCPs)."""
    head: Literal["average", "concat"] = "average"
    """average: one head per modality, logits averaged; concat: one head on the concatenated features."""
    init_std: float = 0.02
    """Standard deviation of the prompts' normal initialisation."""
    prompt_gate: bool = False
    """Not in the paper: blend each fusion-stage output as X + g (X_prompted - X) with X the frozen
    block's output without prompts and g a learned scalar per layer and modality starting at 0 (the
    zero-initialised gating of LLaMA-Adapter, Zhang et al., arXiv 2303.16199), so the model starts
    exactly at its frozen features (and at a head fitted on them) instead of where random prompts
    put it. Costs one more frozen block pass per modality in each fusion layer."""


def append_tokens(state: EncoderState, extra: Tensor, extra_pad: Tensor | None = None) -> EncoderState:
    """Append (B, P, D) tokens after the sequence; they are attendable except where ``extra_pad``
    (B, P) is True (prompts from a modality the example lacks)."""
    tokens = torch.cat([state.tokens, extra], dim=1)  # (B, T + P, D)
    pad = state.pad_mask
    if pad is not None or extra_pad is not None:
        B, T = state.tokens.shape[:2]
        pad = pad if pad is not None else torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
        if extra_pad is None:
            extra_pad = pad.new_zeros(B, extra.shape[1])
        pad = torch.cat([pad, extra_pad], dim=1)  # (B, T + P)
    return state.replace(tokens=tokens, pad_mask=pad)


def drop_last(state: EncoderState, n: int) -> EncoderState:
    T = state.tokens.shape[1] - n
    pad = None if state.pad_mask is None else state.pad_mask[:, :T]
    return state.replace(tokens=state.tokens[:, :T], pad_mask=pad)


class PairPrompts(nn.Module):
    """Ordered pair a -> b at one fusion layer: QP, QCP in a's space and the MLP d_a -> h -> d_b."""

    def __init__(self, dim_a: int, dim_b: int, hidden: int, num_qp: int, num_qcp: int, std: float):
        super().__init__()
        self.qp = nn.Parameter(torch.randn(num_qp, dim_a) * std)
        self.qcp = nn.Parameter(torch.randn(num_qcp, dim_a) * std) if num_qcp else None
        self.mlp = nn.Sequential(nn.Linear(dim_a, hidden), nn.ReLU(), nn.Linear(hidden, dim_b))

    def query_input(self, state: EncoderState) -> EncoderState:
        """[X_a; QCP; QP] (B, T_a + M_qc + M_q, d_a)."""
        B = state.tokens.shape[0]
        prompts = self.qp if self.qcp is None else torch.cat([self.qcp, self.qp])
        prompts = prompts.to(
            state.tokens.dtype
        )  # pragma: no mutate (a half-precision cast)  (M_qc + M_q, d_a)
        return append_tokens(state, prompts.unsqueeze(0).expand(B, -1, -1))


class FusionLayer(nn.Module):
    """One PMF fusion layer over the given modalities: pair prompts and per-modality FCPs."""

    def __init__(
        self,
        dims: dict,
        hidden: int,
        num_qp: int,
        num_qcp: int,
        num_fcp: int,
        std: float,
        train_fcp: bool,
        gate: bool = False,
    ):
        super().__init__()
        self.num_qp = num_qp
        # prompt_gate: one zero-initialised blend factor per target modality
        self.gates = nn.ParameterDict({b: nn.Parameter(torch.zeros(())) for b in dims}) if gate else None
        self.masks_absent = True  # queries from a modality an example lacks are not attended
        self.pairs = nn.ModuleDict(
            {
                a: nn.ModuleDict(
                    {b: PairPrompts(dims[a], dims[b], hidden, num_qp, num_qcp, std) for b in dims if b != a}
                )
                for a in dims
            }
        )
        self.fcp = nn.Module()  # frozen FCPs are buffers, so adapter checkpoints still hold them
        for b, d in dims.items() if num_fcp else ():
            init = torch.randn(num_fcp, d) * std
            if train_fcp:
                self.fcp.register_parameter(b, nn.Parameter(init))
            else:
                self.fcp.register_buffer(b, init)

    def forward(self, backbone, step: int, states: dict[str, EncoderState]) -> dict[str, EncoderState]:
        out = dict(states)
        mapped: dict[str, list[Tensor]] = {b: [] for b in self.pairs}
        skipped: dict[str, list[Tensor | None]] = {b: [] for b in self.pairs}  # (B,) rows lacking a
        for a, targets in self.pairs.items():  # query stage, on the states entering this layer
            encoder, i = backbone.encoders[a], backbone.layer_at(a, step)
            rows = absent_rows(states, a) if self.masks_absent else None
            for b, pair in targets.items():
                q = encoder.run_block_tail(i, pair.query_input(states[a]), self.num_qp)  # (B, M_q, d_a)
                mapped[b].append(pair.mlp(q))  # (B, M_q, d_b)
                skipped[b].append(rows)
        for b in self.pairs:  # fusion stage
            s = states[b]
            B = s.tokens.shape[0]
            parts = list(mapped[b])  # (M-1) x (B, M_q, d_b)
            if hasattr(self.fcp, b):
                # the appended tokens carry no positions, so their order cannot change the outputs
                fcp = getattr(self.fcp, b).to(s.tokens.dtype)  # pragma: no mutate (a half-precision cast)
                parts.insert(0, fcp.expand(B, -1, -1))  # pragma: no mutate  (B, M_fc, d_b)
            extra = torch.cat(parts, dim=1)  # (B, M_fc + (M-1) M_q, d_b)
            extra_pad = self.skip_absent(skipped[b], B, extra.shape[1], s.tokens.device)
            i = backbone.layer_at(b, step)
            y = drop_last(backbone.run_block(b, i, append_tokens(s, extra, extra_pad)), extra.shape[1])
            out[b] = y if self.gates is None else self.blend(y, backbone.run_block(b, i, s), self.gates[b])
        return out

    @staticmethod
    def blend(prompted: EncoderState, plain: EncoderState, gate: Tensor) -> EncoderState:
        """X + g (X_prompted - X): the frozen block's output where g = 0 (prompt_gate)."""
        g = gate.to(plain.tokens.dtype)  # pragma: no mutate (a half-precision cast)
        return prompted.replace(tokens=plain.tokens + g * (prompted.tokens - plain.tokens))  # (B, T_b, d_b)

    def skip_absent(self, rows: list[Tensor | None], B: int, width: int, device) -> Tensor | None:
        """(B, width) True on the mapped queries of modalities an example lacks (the FCPs, first,
        stay attendable); None when every example has every source modality."""
        if all(r is None for r in rows):
            return None
        blocks = [
            (torch.zeros(B, dtype=torch.bool, device=device) if r is None else r.to(device))
            .unsqueeze(1)
            .expand(B, self.num_qp)
            for r in rows
        ]  # (M-1) x (B, M_q)
        queries = torch.cat(blocks, dim=1)
        fcp = torch.zeros(B, width - queries.shape[1], dtype=torch.bool, device=device)
        return torch.cat([fcp, queries], dim=1)


class PMFBlocks(nn.Module):
    """Replaces the blocks of the last K schedule steps; other modalities run their blocks plainly."""

    def __init__(self, layers: list[FusionLayer], first_step: int, backbone):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.first_step = first_step
        object.__setattr__(self, "backbone", backbone)  # a reference, not a submodule

    def forward(self, step: int, states: dict[str, EncoderState]) -> dict[str, EncoderState]:
        layer = self.layers[step - self.first_step]
        states = layer(self.backbone, step, states)
        for m in self.backbone.modalities:
            i = self.backbone.layer_at(m, step)
            if m not in layer.pairs and i is not None:
                states[m] = self.backbone.run_block(m, i, states[m])
        return states


class PMFHead(nn.Module):
    """Per-modality heads on pooled (CLS) features with logits averaged, or one head on their concat."""

    takes_states = True

    def __init__(self, dims: dict, num_outputs: int, mode: str, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.mode = mode
        if mode == "average":
            self.heads = nn.ModuleDict({m: MLPHead(d, num_outputs, hidden, dropout) for m, d in dims.items()})
        else:
            self.head = MLPHead(sum(dims.values()), num_outputs, hidden, dropout)
        self.modalities = list(dims)
        self.masks_absent = True  # average: over the modalities each example has

    @property
    def probe_target(self) -> MLPHead | None:
        """concat: one head on the concatenated pooled features, the model's features (train.head_init)."""
        return self.head if self.mode == "concat" else None

    def forward(self, states: dict[str, EncoderState], backbone) -> Tensor:
        pooled = {m: backbone.encoders[m].pool(states[m]) for m in self.modalities}  # M x (B, d_m)
        if self.mode == "average":
            logits = torch.stack([self.heads[m](x) for m, x in pooled.items()])  # (M, B, C)
            if self.masks_absent and next(iter(states.values())).absent is not None:
                weights = present_weights(states, self.modalities, logits[0])  # (M, B)
                return (logits * weights.unsqueeze(-1)).sum(0)  # (B, C)
            return logits.mean(0)  # (B, C)
        return self.head(torch.cat(list(pooled.values()), dim=-1))  # pragma: no mutate ((B, d) parts)  (B, C)


@register_method("pmf")
class PMF(Method):
    config_class = PMFConfig
    min_modalities = 2
    needs_blocks_in_every_tower = True
    missing = "queries from an absent modality are masked out of attention; the average head averages the present ones"
    blockless_hint = (
        "PMF's fusion layers run the last num_fusion_layers blocks of every tower they fuse; leave it "
        "out of 'modalities' (PMF then fuses the others, at least 2 with blocks) or fuse final "
        "features instead (wander, lmf, tfn, late_fusion)"
    )

    @classmethod
    def attach(cls, model, cfg: PMFConfig):
        if cfg.layers is not None:
            raise ValueError("pmf: fusion layers are the last num_fusion_layers blocks; do not set layers")
        if cfg.num_fusion_layers < 1 or cfg.num_qp < 1 or cfg.num_qcp < 0 or cfg.num_fcp < 0:
            raise ValueError("pmf: num_fusion_layers and num_qp must be >= 1, num_qcp and num_fcp >= 0")
        backbone = model.backbone
        mods = cls.modalities(model, cfg)
        refuse_frame_batches("pmf", backbone.encoders, mods)
        K = cfg.num_fusion_layers
        for m in mods:
            n = backbone.encoders[m].num_layers
            if n < K:
                raise ValueError(f"pmf: encoder {m!r} has {n} blocks, fewer than num_fusion_layers={K}")
        dims = {m: backbone.encoders[m].dim for m in mods}
        hidden = cfg.mlp_hidden or max(dims.values()) // 2
        layers = [
            FusionLayer(
                dims,
                hidden,
                cfg.num_qp,
                cfg.num_qcp,
                cfg.num_fcp,
                cfg.init_std,
                cfg.train_fcp,
                cfg.prompt_gate,
            )
            for _ in range(K)
        ]
        for layer in layers:
            layer.masks_absent = model.missing.masks
        first = backbone.num_steps - K
        blocks = PMFBlocks(layers, first, backbone)
        for step in range(first, backbone.num_steps):
            backbone.add_layer_module(step, blocks, replaces_blocks=True)
        h = model.head_config
        if h.num_outputs > 0:
            all_dims = {m: e.dim for m, e in backbone.encoders.items()}
            head = PMFHead(all_dims, h.num_outputs, cfg.head, h.hidden, h.dropout)
            head.masks_absent = model.missing.masks
            model.set_head(head)
        return blocks
