"""Missing modalities (DESIGN §6): examples that lack a modality, at training or at test time.

A batch says which examples lack which modality (``batch["absent"]``: {modality: (B,) bool, True =
absent}). The slot of an absent input holds a stand-in (another example's input, see
``data.base.collate_examples``) so every encoder still runs on one tensor per batch; the frozen
prefix runs on it and nothing after that sees it: at the first schedule step where anything
trains (the step the prefix cache hands over at), ``MissingModalities.fill`` overwrites the
absent examples' tokens. From there on every state carries the batch's absences
(``EncoderState.absent``) so that methods can mask what they fuse. What the tokens become is
``model.missing``:

- ``zeros`` (no parameters): zero tokens from that step on, and a zero final sequence, so an
  absent modality's pooled feature is 0 (nothing for a linear head or TFN/LMF's outer products).
- ``placeholder``: one learned token per modality (initialised at zero, so an untrained
  placeholder is ``zeros`` until the final sequence), repeated over the positions. A sequence of
  identical tokens gives the frozen blocks nothing to tell positions apart by, so one token stands
  for a placeholder sequence of any length; gradients reach it through everything that follows.
- ``error``: a batch with an absent modality is an error naming the examples.
- ``auto`` (the default): ``placeholder`` when the run trains with ``train.modality_dropout``,
  else ``zeros`` (resolved when the run is built and written to its config).

Every computation stays per example, so the complete examples of a batch get exactly the outputs
they get without the incomplete ones (tests/test_missing.py checks that for every method).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .config import ConfigError
from .data.base import DataError
from .encoders.base import EncoderState

STRATEGIES = ("auto", "zeros", "placeholder", "error")

Absent = dict[str, Tensor]


def resolve_strategy(strategy: str, modality_dropout: Mapping | float | None) -> str:
    """``auto`` -> ``placeholder`` when training drops modalities, else ``zeros``."""
    if strategy != "auto":
        return strategy
    return "placeholder" if modality_dropout else "zeros"


def dropout_rates(setting: dict | float | None, modalities: list[str]) -> dict[str, float]:
    """``train.modality_dropout`` -> {modality: rate}; a number applies to every modality."""
    if not setting:
        return {}
    rates = dict.fromkeys(modalities, float(setting)) if isinstance(setting, (int, float)) else dict(setting)
    unknown = sorted(set(rates) - set(modalities))
    if unknown:
        raise ConfigError(f"train.modality_dropout names {unknown}; the model has {modalities}")
    for m, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ConfigError(f"train.modality_dropout.{m} must be a rate in [0, 1), got {rate!r}")
    return {m: float(r) for m, r in rates.items() if r > 0}


def absent_rows(states: Mapping[str, EncoderState], modality: str) -> Tensor | None:
    """(B,) bool, True where the example lacks ``modality``; None when no example does."""
    absent = states[modality].absent
    return None if absent is None else absent.get(modality)


def zero_absent(x: Tensor, states: Mapping[str, EncoderState], modality: str, active: bool = True) -> Tensor:
    """``x`` (B, ...) with the rows of examples that lack ``modality`` set to 0 (if ``active``)."""
    rows = absent_rows(states, modality) if active else None
    if rows is None:
        return x
    return x.masked_fill(per_row(rows, x.shape[0]).view(-1, *([1] * (x.dim() - 1))), 0.0)


def per_row(marks: Tensor, rows: int) -> Tensor:
    """(B,) marks for a tensor of ``rows`` = k·B rows (a video tower's B·N frames): each repeated k times."""
    return marks if rows == marks.shape[0] else marks.repeat_interleave(rows // marks.shape[0])


def present_weights(states: Mapping[str, EncoderState], modalities: list[str], like: Tensor) -> Tensor:
    """(M, B) weights that average over the modalities each example has: 1/count where present."""
    B = like.shape[0]
    rows = [absent_rows(states, m) for m in modalities]
    have = torch.stack(
        [torch.ones(B, dtype=torch.bool, device=like.device) if r is None else ~r for r in rows]
    ).to(like.dtype)  # (M, B)
    return have / have.sum(0, keepdim=True).clamp_min(1.0)


def check_absent(
    absent: Mapping[str, Tensor] | None, modalities: list[str], ids: list | None = None
) -> Absent | None:
    """The batch's absence masks restricted to ones that mark something; errors name the culprit."""
    if not absent:
        return None
    unknown = sorted(set(absent) - set(modalities))
    if unknown:
        raise DataError(f"absent modalities {unknown} are not the model's; it has {modalities}")
    marks = {m: a.bool() for m, a in absent.items() if a is not None and bool(a.any())}
    if not marks:
        return None
    # an example can lack everything only when every modality marks some example
    none_left = torch.stack(list(marks.values())).all(0) if len(marks) == len(modalities) else None
    if none_left is not None and bool(none_left.any()):
        j = int(none_left.nonzero()[0])
        who = ids[j] if ids is not None and j < len(ids) else j
        raise DataError(
            f"example {who!r} lacks every modality of the model ({modalities}); nothing is left to use"
        )
    return marks


def describe(marks: Absent, ids: list | None) -> str:
    parts = []
    for m, rows in marks.items():
        idx = rows.nonzero().flatten().tolist()
        who = [ids[j] if ids is not None and j < len(ids) else j for j in idx[:3]]
        parts.append(f"{m!r} for {len(idx)} example(s) (e.g. {who})")
    return ", ".join(parts)


class MissingModalities(nn.Module):
    """Overwrites absent examples' tokens at the first trainable step (see the module docstring)."""

    def __init__(self, dims: dict[str, int], strategy: str):
        super().__init__()
        if strategy not in STRATEGIES or strategy == "auto":
            raise ValueError(f"model.missing must be one of {STRATEGIES[1:]} once resolved, got {strategy!r}")
        self.strategy = strategy
        self.placeholder = (
            nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m, d in dims.items()})
            if strategy == "placeholder"
            else None
        )

    @property
    def masks(self) -> bool:
        """Fusion methods leave absent modalities out (``zeros``); a learned placeholder is used
        like an input instead."""
        return self.strategy == "zeros"

    def fill(self, states: dict[str, EncoderState], marks: Absent, ids: list | None = None) -> dict:
        if self.strategy == "error":
            raise DataError(
                f"the batch lacks {describe(marks, ids)} and model.missing is 'error'; set model.missing "
                "to 'zeros' or 'placeholder' to train or evaluate with absent modalities"
            )
        out = {}
        for m, s in states.items():
            tokens = s.tokens
            if m in marks:
                rows = per_row(marks[m].to(tokens.device), tokens.shape[0]).view(-1, 1, 1)  # (B, 1, 1)
                value = (
                    tokens.new_zeros(()) if self.placeholder is None else self.placeholder[m].to(tokens.dtype)
                )
                tokens = torch.where(rows, value, tokens)  # (B, T, D)
            out[m] = s.replace(tokens=tokens, absent=marks)
        return out

    def finish(self, states: dict[str, EncoderState]) -> dict[str, EncoderState]:
        """``zeros``: the final sequences of absent examples are zero too (pooled features 0)."""
        if self.strategy != "zeros":
            return states
        return {m: s.replace(tokens=zero_absent(s.tokens, states, m)) for m, s in states.items()}
