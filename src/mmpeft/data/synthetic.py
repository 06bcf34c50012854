"""`synthetic`: a small learnable multimodal task for the toy encoders (smoke runs and tests).

Every example has, per modality m, a hidden code c_m (K numbers for classification, one for
regression) drawn from N(0, 1). Modality m's input is a (T, F_m) sequence of unit Gaussian noise
plus ``signal`` times the code mapped to F_m features by a fixed random projection (the same in
every step). The target needs all modalities: the class is argmax_k sum_m c_m[k], the
regression value sum_m c_m. So each modality alone is only partly informative, and fusing them
is what solves the task. Everything is deterministic given ``seed``; the projections are shared
by all splits, the examples of each split are drawn from their own stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

from ..registry import register_dataset
from .base import DataError, DatasetReader, ExampleList, ReaderConfig, canonical_split

SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}


@dataclass
class SyntheticConfig(ReaderConfig):
    """``root`` is unused."""

    input_dims: dict = field(default_factory=lambda: {"text": 8, "image": 6})
    """Modality -> feature width F_m of its (T, F_m) input sequences."""
    task: Literal["classification", "regression"] = "classification"
    """Target kind: a class index or one real value."""
    num_classes: int = 3
    """Classes K of the classification target."""
    sizes: dict = field(default_factory=lambda: {"train": 256, "val": 64, "test": 64})
    """Split -> number of examples."""
    min_len: int = 4
    """Shortest sequence (steps)."""
    max_len: int = 12
    """Longest sequence (steps); keep it within the encoders' ``max_len``."""
    signal: float = 1.0
    """Strength of the code in the inputs relative to the unit noise."""
    seed: int = 0
    """Seed of the projections and of every split's examples."""


@register_dataset("synthetic")
class SyntheticReader(DatasetReader):
    config_class = SyntheticConfig

    def __init__(self, cfg: SyntheticConfig):
        super().__init__(cfg)
        if not cfg.input_dims or any(not isinstance(d, int) or d < 1 for d in cfg.input_dims.values()):
            raise DataError(
                f"synthetic: input_dims must map modalities to positive widths, got {cfg.input_dims}"
            )
        if not 1 <= cfg.min_len <= cfg.max_len:
            raise DataError(f"synthetic: need 1 <= min_len <= max_len, got {cfg.min_len}, {cfg.max_len}")
        if cfg.task == "classification" and cfg.num_classes < 2:
            raise DataError("synthetic: num_classes must be at least 2")
        self.splits = tuple(canonical_split(s, tuple(SPLIT_STREAMS), self.name) for s in cfg.sizes)
        self.code_dim = cfg.num_classes if cfg.task == "classification" else 1
        rng = np.random.default_rng(cfg.seed)
        self.proj = {  # modality -> (K, F_m) projection with unit-norm rows
            m: (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)
            for m, d in cfg.input_dims.items()
            for p in [rng.standard_normal((self.code_dim, d))]
        }
        self._cache: dict[str, list[dict]] = {}

    @property
    def modalities(self) -> list[str]:
        return list(self.cfg.input_dims)

    def info(self) -> dict[str, Any]:
        if self.cfg.task == "classification":
            k = self.cfg.num_classes
            return {
                "num_classes": k,
                "label_names": [str(i) for i in range(k)],
                "feature_dims": dict(self.cfg.input_dims),
            }
        return {"num_targets": 1, "feature_dims": dict(self.cfg.input_dims)}

    def generate(self, split: str) -> list[dict]:
        cfg = self.cfg
        sizes = {canonical_split(s, tuple(SPLIT_STREAMS), self.name): n for s, n in cfg.sizes.items()}
        rng = np.random.default_rng([cfg.seed, SPLIT_STREAMS[split]])
        examples = []
        for i in range(sizes[split]):
            codes = {m: rng.standard_normal(self.code_dim).astype(np.float32) for m in cfg.input_dims}  # (K,)
            inputs = {}
            for m, d in cfg.input_dims.items():
                T = int(rng.integers(cfg.min_len, cfg.max_len + 1))
                noise = rng.standard_normal((T, d)).astype(np.float32)  # (T, F_m)
                inputs[m] = noise + cfg.signal * (codes[m] @ self.proj[m])[None, :]  # (T, F_m)
            total = np.sum(list(codes.values()), axis=0)  # (K,)
            target: Any = int(np.argmax(total)) if cfg.task == "classification" else float(total[0])
            examples.append({"inputs": inputs, "target": target, "id": f"{split}/{i}"})
        return examples

    def split(self, name: str):
        split = canonical_split(name, self.splits, self.name)
        if split not in self._cache:
            self._cache[split] = self.generate(split)
        return ExampleList(len(self._cache[split]), partial(self.example, split), f"synthetic[{split}]")

    def example(self, split: str, i: int) -> dict:
        ex = self._cache[split][i]
        return {
            "inputs": {m: x.copy() for m, x in ex["inputs"].items()},
            "target": ex["target"],
            "id": ex["id"],
        }
