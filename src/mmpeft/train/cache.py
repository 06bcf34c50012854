"""Prefix caching (DESIGN §5): the frozen prefix's states, computed once per distinct input.

When every trainable module acts at schedule step s > 0 or later, the states entering step s are
a pure function of the input (frozen encoders run in eval mode, without dropout), and each
modality's states depend on its own input only. The trainer computes them once per distinct
input of each modality, files them in a ``FeatureStore`` on disk (shared by later runs, bench
methods and tune trials; see ``feature_store``) or in memory, and trains and evaluates from
them. Each example's rows are stored trimmed of trailing padding and re-padded per batch, so any
batch composition gives the states an uncached batch would give.

Requirements (checked): the reader does not augment, the encoders keep no per-batch ``extras``.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from torch import Tensor, nn

from ..data.base import DataError, lacks
from ..encoders.base import EncoderState
from ..encoders.video import rows_per_example
from .batches import to_device
from .feature_store import FeatureStore, content_hash, encoder_fingerprint
from .progress import progress_bar

log = logging.getLogger("mmpeft")


class CacheError(ValueError):
    """Prefix caching cannot be used for this model or data; the message says why."""


class TrainModule(nn.Module):
    """What the accelerator wraps: the model's forward from raw inputs or from cached states."""

    def __init__(self, model: nn.Module, start_step: int = 0):
        super().__init__()
        self.model = model
        self.start_step = start_step

    def forward(
        self,
        inputs: dict[str, Any],
        cached: bool = False,
        ids: list | None = None,
        absent: dict | None = None,
    ) -> dict[str, Any]:
        if not cached:
            return self.model(inputs, ids=ids, absent=absent)
        return self.model(states=inputs, start_step=self.start_step, ids=ids, absent=absent)


def cacheable_step(model: nn.Module, reader: Any) -> int:
    """The schedule step s to cache up to; raises CacheError when caching would change results."""
    s = model.backbone.first_trainable_step()
    if s < 0:
        raise CacheError(
            "prefix caching needs a frozen prefix, but the embeddings train "
            "(a method trains them, e.g. full); set train.prefix_cache=false"
        )
    if reader.augments:
        raise CacheError(f"prefix caching needs fixed inputs, but dataset {reader.name!r} augments them")
    return s


class MemoryStore:
    """The in-memory stand-in for a ``FeatureStore`` (``train.cache_dir: ""``): lives for one run."""

    def __init__(self):
        self.rows: dict[str, tuple[Tensor, Tensor | None]] = {}
        self.layout = (0, 0)
        self.earlier: list = []  # nothing to continue from: it holds one run's rows only

    def missing(self, hashes: list[str]) -> list[str]:
        return [h for h in dict.fromkeys(hashes) if h not in self.rows]

    def put(self, rows: dict, layout: tuple[int, int]) -> None:
        self.rows.update(rows)
        self.layout = layout

    def get(self, hashes: list[str]) -> tuple[dict, tuple[int, int]]:
        return {h: self.rows[h] for h in dict.fromkeys(hashes)}, self.layout


def open_stores(model, step: int, root: str | None, precision: str) -> dict[str, Any]:
    """One store per modality: on disk under ``root`` (shared by runs), or in memory when root is
    empty or the model was not built from a config (nothing to fingerprint its preprocessing by)."""
    bb = model.backbone
    specs = (getattr(model, "config", None) or {}).get("encoders", {})
    stores: dict[str, Any] = {}
    for m, enc in bb.encoders.items():
        if not root or m not in specs:
            stores[m] = MemoryStore()
            continue
        n = blocks_before(bb, m, step)
        fingerprint = encoder_fingerprint(enc, specs[m], n, precision)
        stores[m] = FeatureStore(root, fingerprint)
        # stores of the same encoder after fewer blocks, deepest first: their rows continue from
        # there (a bench mixing post-fusion and last-blocks methods embeds each input once)
        for k in range(n - 1, -1, -1):
            earlier = FeatureStore(root, {**fingerprint, "blocks": k})
            if os.path.isdir(earlier.folder):
                stores[m].earlier.append((k, earlier))
    return stores


def blocks_before(bb, modality: str, step: int) -> int:
    """How many blocks of ``modality`` run before schedule step ``step``."""
    return min(max(0, step - bb.offset(modality)), bb.encoders[modality].num_layers)


class PrefixCache:
    """Per-example states at step ``step`` of one split, plus targets and ids.

    Rows are shared between examples with equal inputs (an image and its five captions)."""

    def __init__(self, step: int):
        self.step = step
        self.rows: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
        self.layout: dict[str, tuple[int, int]] = {}  # modality -> (n_prefix, n_prompt)
        self.targets: list[Any] = []
        self.ids: list[Any] = []
        self.absent: dict[str, list[bool]] = {}  # modality -> per example: it lacks the modality
        self.frames: dict[str, int] = {}  # modality -> rows per example in the blocks (video: N frames)
        self.computed = 0  # distinct inputs computed (not found in the store) while building
        self.continued = 0  # of which continued from a store of fewer blocks, not from the raw input

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    @torch.no_grad()
    def build(
        cls, model, dataset, step: int, batch_size: int, device, autocast, stores: dict | None = None
    ) -> PrefixCache:
        """Read ``dataset`` once, compute the states of inputs the stores lack, then gather every row."""
        cache = cls(step)
        bb = model.backbone
        cache.frames = {m: rows_per_example(e) for m, e in bb.encoders.items()}
        stores = stores or {m: MemoryStore() for m in bb.modalities}
        hashes = cache._read(dataset, bb.modalities)
        was_training = model.training
        model.eval()
        try:
            for m in bb.modalities:
                cache._compute_missing(bb, m, dataset, hashes[m], stores[m], batch_size, device, autocast)
        finally:
            model.train(was_training)
        for m in bb.modalities:
            rows, cache.layout[m] = stores[m].get([h for h in hashes[m] if h is not None])
            cache.rows[m] = [None if h is None else rows[h] for h in hashes[m]]
        return cache

    def _read(self, dataset, modalities: list[str]) -> dict[str, list[str]]:
        """One pass over the split: targets, ids and each modality's input hash per example."""
        hashes: dict[str, list[str]] = {m: [] for m in modalities}
        for i in range(len(dataset)):
            ex = dataset[i]
            if all(lacks(ex, m) for m in modalities):
                raise DataError(f"example {ex.get('id')!r} has none of the model's modalities {modalities}")
            for m in modalities:
                self.absent.setdefault(m, []).append(lacks(ex, m))
                if ex["inputs"].get(m) is None:  # nothing to compute: collate puts a stand-in row here
                    hashes[m].append(None)
                    continue
                try:
                    hashes[m].append(content_hash(ex["inputs"][m]))
                except TypeError as e:
                    raise CacheError(
                        f"prefix caching: {m!r} input of example {ex.get('id')!r}: {e}"
                    ) from None
            self.targets.append(ex.get("target"))
            self.ids.append(ex.get("id"))
        return hashes

    def _compute_missing(self, bb, m, dataset, hashes, store, batch_size, device, autocast) -> None:
        todo = store.missing([h for h in hashes if h is not None])
        if not todo:
            return
        first = {}
        for i, h in enumerate(hashes):
            first.setdefault(h, i)
        log.info("prefix cache: computing %d %s input(s)", len(todo), m)
        n_blocks = blocks_before(bb, m, self.step)
        writer = ShardWriter(store)
        todo = self._continue_from_earlier(bb, m, todo, store, n_blocks, writer, batch_size, device, autocast)
        enc = bb.encoders[m]
        bar = progress_bar(len(todo), f"caching {m}")
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch = enc.collate([dataset[first[h]]["inputs"][m] for h in chunk])
            with autocast():
                state = run_blocks(bb, m, enc.embed(to_device(batch, device)), 0, n_blocks)
            writer.add(m, chunk, per_example(state, self.frames[m]))
            bar.update(len(chunk))
        bar.close()
        writer.flush()
        self.computed += writer.count

    def _continue_from_earlier(self, bb, m, todo, store, n_blocks, writer, batch_size, device, autocast):
        """Run the last blocks on states the store's shallower twins hold; returns what is left."""
        for k, earlier in store.earlier:  # deepest first
            absent = set(earlier.missing(todo))
            found = [h for h in todo if h not in absent]
            if not found:
                continue
            log.info("prefix cache: %d %s input(s) continue from block %d", len(found), m, k)
            for start in range(0, len(found), batch_size):
                chunk = found[start : start + batch_size]
                rows, (n_prefix, n_prompt) = earlier.get(chunk)
                state = EncoderState(
                    *_pad_rows([rows[h] for h in chunk]), n_prefix=n_prefix, n_prompt=n_prompt
                )
                state = per_frame(state, self.frames[m])
                with autocast():
                    state = run_blocks(bb, m, to_device(state, device), k, n_blocks)
                writer.add(m, chunk, per_example(state, self.frames[m]))
            self.continued += len(found)
            todo = [h for h in todo if h in absent]
        return todo

    @classmethod
    def concat(cls, caches: list[PrefixCache]) -> PrefixCache:
        """The examples of several caches of the same step, in order (train+val for a refit)."""
        out = cls(caches[0].step)
        out.layout = dict(caches[0].layout)
        out.frames = dict(caches[0].frames)
        for c in caches:
            if c.step != out.step or c.layout != out.layout:
                raise CacheError("prefix caching: cannot join caches of different steps or layouts")
            for m, rows in c.rows.items():
                out.rows.setdefault(m, []).extend(rows)
            out.targets += c.targets
            out.ids += c.ids
            for m, marks in c.absent.items():
                out.absent.setdefault(m, []).extend(marks)
        return out

    def with_changes(self, rows: dict | None = None, absent: dict | None = None) -> PrefixCache:
        """A view of the same examples with some modalities' rows or absence marks replaced
        (the rest, targets and ids shared, not copied)."""
        out = copy.copy(self)
        out.rows = {**self.rows, **(rows or {})}
        out.absent = {**self.absent, **(absent or {})}
        return out

    def nbytes(self) -> int:
        seen, total = set(), 0
        for rows in self.rows.values():
            for t, _ in filter(None, rows):  # None: an example without that input
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    def collate(self, indices: list[int]) -> dict[str, Any]:
        """Cached examples -> {"inputs": {m: EncoderState}, "targets", "ids", "cached": True}."""
        inputs, absent = {}, {}
        for m, rows in self.rows.items():
            picked = [rows[i] for i in indices]
            if any(row is None for row in picked):  # an example without this input: a stand-in row
                fill = next((row for row in picked if row is not None), None) or self.stand_in(m)
                picked = [fill if row is None else row for row in picked]
            marks = [self.absent[m][i] for i in indices] if m in self.absent else []
            if any(marks):
                absent[m] = torch.tensor(marks, dtype=torch.bool)
            n_prefix, n_prompt = self.layout[m]
            state = EncoderState(*_pad_rows(picked), n_prefix=n_prefix, n_prompt=n_prompt)
            inputs[m] = per_frame(state, self.frames.get(m, 1))
        batch = {
            "inputs": inputs,
            "targets": [self.targets[i] for i in indices],
            "ids": [self.ids[i] for i in indices],
            "cached": True,
        }
        if absent:
            batch["absent"] = absent
        return batch

    def stand_in(self, modality: str) -> tuple[Tensor, Tensor | None]:
        row = next((row for row in self.rows[modality] if row is not None), None)
        if row is None:
            raise CacheError(f"prefix caching: no example of this split has a {modality!r} input to stand in")
        return row


def per_example(state: EncoderState, k: int) -> EncoderState:
    """A block-level state of k rows per example (a video tower's frames) as one row per example:
    (B·k, T, D) -> (B, k·T, D), so the store keeps each example's frames together."""
    if k == 1:
        return state
    BK, T, D = state.tokens.shape
    pad = None if state.pad_mask is None else state.pad_mask.reshape(BK // k, k * T)
    return state.replace(tokens=state.tokens.reshape(BK // k, k * T, D), pad_mask=pad)


def per_frame(state: EncoderState, k: int) -> EncoderState:
    """The inverse of ``per_example``: (B, k·T, D) -> (B·k, T, D)."""
    if k == 1:
        return state
    B, KT, D = state.tokens.shape
    pad = None if state.pad_mask is None else state.pad_mask.reshape(B * k, KT // k)
    return state.replace(tokens=state.tokens.reshape(B * k, KT // k, D), pad_mask=pad)


def run_blocks(bb, modality: str, state: EncoderState, start: int, stop: int) -> EncoderState:
    for i in range(start, stop):
        state = bb.run_block(modality, i, state)
    return state


class ShardWriter:
    """Collects computed rows and files them in the store about every 64 MiB."""

    def __init__(self, store):
        self.store, self.pending, self.layout, self.count, self.bytes = store, {}, (0, 0), 0, 0

    def add(self, modality: str, hashes: list[str], state: EncoderState) -> None:
        self.layout = check_state(modality, state)
        rows = trimmed_rows(state)
        self.pending.update(zip(hashes, rows, strict=True))
        self.count += len(hashes)
        self.bytes += sum(t.numel() * t.element_size() for t, _ in rows)
        if self.bytes > 64 * 2**20:
            self.flush()

    def flush(self) -> None:
        self.store.put(self.pending, self.layout)
        self.pending, self.bytes = {}, 0


def check_state(modality: str, state: EncoderState) -> tuple[int, int]:
    """The state's token layout; per-batch ``extras`` cannot be cached."""
    if state.extras:
        raise CacheError(
            f"prefix caching: encoder {modality!r} keeps per-batch extras {sorted(state.extras)}; "
            "set train.prefix_cache=false"
        )
    return state.n_prefix, state.n_prompt


def trimmed_rows(state: EncoderState) -> list[tuple[Tensor, Tensor | None]]:
    """Each example's (tokens (T_i, D), pad (T_i,) or None), cut after its last real token."""
    tokens = state.tokens.detach().cpu()  # (B, T, D)
    pad = None if state.pad_mask is None else state.pad_mask.cpu()  # (B, T)
    rows = []
    for b in range(tokens.shape[0]):
        if pad is None:
            rows.append((tokens[b].clone(), None))
            continue
        real = (~pad[b]).nonzero()
        n = int(real.max()) + 1 if len(real) else 1  # keep up to the last real token
        rows.append((tokens[b, :n].clone(), pad[b, :n].clone()))
    return rows


def _pad_rows(rows: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """Rows (T_i, D) with masks (T_i,) -> tokens (B, T, D) zero-padded and pad mask (B, T)."""
    if all(p is None for _, p in rows) and len({t.shape[0] for t, _ in rows}) == 1:
        return torch.stack([t for t, _ in rows]), None
    T = max(t.shape[0] for t, _ in rows)
    first = rows[0][0]
    tokens = first.new_zeros(len(rows), T, first.shape[-1])
    pad = torch.ones(len(rows), T, dtype=torch.bool)
    for b, (t, p) in enumerate(rows):
        tokens[b, : t.shape[0]] = t
        pad[b, : t.shape[0]] = False if p is None else p
    return tokens, pad
