"""Does a fusion model use each modality? Its test score with one modality's input replaced.

For each modality m the test split is scored again with m's input of every example taken from
another example (a fixed random derangement, so no example keeps its own input; the marginal
distribution of m's inputs is unchanged — permutation importance, Breiman 2001, "Random Forests",
Machine Learning 45). A model that ignores m scores the same; the drop is m's contribution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .cache import PrefixCache


def derangement(n: int, seed: int = 0) -> list[int]:
    """A permutation of range(n) with no fixed point (n >= 2): a seeded shuffle, then a cyclic shift."""
    order = np.random.default_rng(seed).permutation(n)
    shifted = np.empty(n, dtype=np.int64)
    shifted[order] = np.roll(order, 1)  # each example takes the input of the next one in the shuffle
    return shifted.tolist()


class ReplacedInput(Dataset):
    """``dataset`` with modality ``modality``'s input of example i taken from example ``source[i]``."""

    def __init__(self, dataset, modality: str, source: list[int]):
        self.dataset, self.modality, self.source = dataset, modality, source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.dataset[i]
        other = self.dataset[self.source[i]]["inputs"].get(self.modality)
        if other is None:  # the donor lacks it too: the example keeps its own (or its absence)
            return ex
        return {**ex, "inputs": {**ex["inputs"], self.modality: other}}


def replaced(source, modality: str, perm: list[int]):
    """The split (a dataset or a prefix cache) with one modality's inputs permuted by ``perm``."""
    if isinstance(source, PrefixCache):
        rows = source.rows[modality]
        # a donor without the input leaves the example its own row (or its absence), as above
        take = [j if rows[j] is not None else i for i, j in enumerate(perm)]
        absent = source.absent.get(modality)
        return source.with_changes(
            rows={modality: [rows[j] for j in take]},
            absent={} if absent is None else {modality: [absent[j] for j in take]},
        )
    return ReplacedInput(source, modality, perm)


def modality_contributions(evaluate, source, modalities: list[str], seed: int = 0) -> dict[str, dict]:
    """{modality: metrics on ``source`` with that modality's inputs replaced} via ``evaluate(source)``."""
    perm = derangement(len(source), seed)
    return {m: evaluate(replaced(source, m, perm)) for m in modalities}
