"""Evaluation: one pass over a split with the task's meter; ``evaluate_run`` re-scores a saved run."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from ..adapter_io import load_adapter
from ..data.base import DataError, StandIns, collate_examples
from ..data.perturb import MissingDataset, NoisyDataset, drawn_missing
from ..run_config import read_yaml
from .batches import IndexDataset, make_loader, sequential_batches, to_device
from .cache import PrefixCache, TrainModule, cacheable_step, open_stores
from .feature_store import cache_root
from .progress import progress_bar
from .setup import build_components, make_accelerator


def split_loader(source, batches: list[list[int]], encoders, num_workers: int = 0, generator=None):
    """A DataLoader over a dataset (collated by the encoders) or over a prefix cache."""
    if isinstance(source, PrefixCache):
        return make_loader(IndexDataset(len(source)), batches, source.collate, 0, generator)
    collate = partial(collate_examples, encoders=encoders, stand_in=StandIns(source))
    return make_loader(source, batches, collate, num_workers, generator)


def device_batch(batch: dict[str, Any], device) -> dict[str, Any]:
    moved = {**batch, "inputs": to_device(batch["inputs"], device)}
    if "absent" in batch:
        moved["absent"] = to_device(batch["absent"], device)
    return moved


def forward_options(batch: dict[str, Any]) -> dict[str, Any]:
    """The ``TrainModule`` keywords a collated batch carries."""
    return {"cached": batch.get("cached", False), "ids": batch.get("ids"), "absent": batch.get("absent")}


@torch.no_grad()
def evaluate(
    module: TrainModule,
    task,
    source,
    batch_size: int,
    device,
    autocast,
    num_workers=0,
    reference=None,
    banks: dict | None = None,
) -> dict:
    """Metrics of ``task`` over every example of ``source`` (a split dataset or a prefix cache).

    Every meter gets the model first (``bind_model``): it may run it again when computing (the
    retrieval task's ITM re-ranking); ``compute`` runs in eval mode under autocast. A meter that
    ranks against the training split (``wants_reference``: retrieval's hubness correction) gets
    the model's outputs on ``reference`` (that split or its prefix cache, or a function that returns
    it, called only then) first. ``banks``, a dict the caller keeps while the model does not
    change, holds that bank across calls (``RunEvaluator``: one bank for every perturbed test)."""
    was_training = module.training
    module.eval()
    meter = task.meter()
    meter.bind_model(module.model)
    try:
        if meter.wants_reference:
            if reference is None:
                raise ValueError(
                    f"task {task.name!r}: its metrics rank against the training split, and none was given"
                )
            bank = (banks or {}).get("reference")
            if bank is None:
                reference = reference() if callable(reference) else reference
                bank = meter.reference_meter()
                run_split(module, bank, reference, batch_size, device, autocast, num_workers, "reference")
                if banks is not None:
                    banks["reference"] = bank
            meter.set_reference(bank)
        run_split(module, meter, source, batch_size, device, autocast, num_workers, "evaluating")
        with autocast():
            metrics = meter.compute()
    finally:
        module.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


def run_split(module: TrainModule, meter, source, batch_size, device, autocast, num_workers, label) -> None:
    """Feed the model's outputs on every example of ``source`` to ``meter``, in order."""
    batches = sequential_batches(len(source), batch_size)
    # a private generator: evaluating never draws from the global RNG (resumed runs stay exact)
    loader = split_loader(source, batches, module.model.backbone.encoders, num_workers, torch.Generator())
    bar = progress_bar(len(batches), label)
    try:
        for batch in loader:
            bar.update(1)
            batch = device_batch(batch, device)
            with autocast():
                outputs = module(batch["inputs"], **forward_options(batch))
            meter.update(outputs, batch)
    finally:
        bar.close()


class RunEvaluator:
    """A finished run rebuilt once from ``run_dir/config.yaml`` + ``run_dir/adapter``, scored under
    any number of conditions (``mmpeft eval``, ``mmpeft robustness``)."""

    def __init__(self, run_dir: str):
        config_file = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{run_dir!r} has no config.yaml; is it the --output of `mmpeft train`?")
        self.run_dir = run_dir
        self.comps = build_components(read_yaml(config_file))
        load_adapter(self.comps.model, os.path.join(run_dir, "adapter"))
        self.train_cfg = self.comps.validated.train
        self.accelerator = make_accelerator(self.train_cfg)
        self.module = TrainModule(self.comps.model).to(self.accelerator.device)
        self.splits: dict = {}
        self.caches: dict[str, PrefixCache] = {}
        self.banks: dict = {}  # the reference bank of ranking metrics, embedded once: the model is fixed

    @property
    def modalities(self) -> list[str]:
        return self.comps.model.backbone.modalities

    def split(self, name: str):
        reader = self.comps.reader
        if name not in reader.splits:
            raise DataError(f"dataset {reader.name!r} has no split {name!r}; it has {list(reader.splits)}")
        if name not in self.splits:
            self.splits[name] = reader.split(name)
        return self.splits[name]

    def check_modalities(self, levels: dict[str, float], flag: str) -> None:
        unknown = sorted(set(levels) - set(self.modalities))
        if unknown:
            raise DataError(
                f"{flag} names {unknown}, which the model of {self.run_dir!r} does not have; it has "
                f"{self.modalities}"
            )

    def cached(self, name: str) -> PrefixCache | None:
        """The split's prefix-cache states when the run used the cache (read from the shared store,
        computed where it lacks them), else None."""
        cfg, model, acc = self.train_cfg, self.comps.model, self.accelerator
        if not cfg.prefix_cache:
            return None
        if name not in self.caches:
            step = cacheable_step(model, self.comps.reader)
            stores = open_stores(model, step, cache_root(cfg.cache_dir), str(acc.mixed_precision))
            bs = cfg.eval_batch_size or cfg.batch_size
            dataset = self.split(name)
            self.caches[name] = PrefixCache.build(model, dataset, step, bs, acc.device, acc.autocast, stores)
            self.module.start_step = step
        return self.caches[name]

    def score(
        self, split: str = "test", noise: dict | None = None, missing: dict | None = None, seed: int = 0
    ) -> dict[str, float]:
        """``noise`` ({modality: level}) adds Gaussian noise to those raw inputs, ``missing``
        ({modality: rate}) removes them from that fraction of the examples (``data.perturb``).
        A run trained with the prefix cache is scored from it, unless noise changes the inputs."""
        if noise:
            self.check_modalities(noise, "--noise")
        if missing:
            self.check_modalities(missing, "--missing")
        cache = None if noise else self.cached(split)
        if cache is not None:
            dataset = cache_with_missing(cache, missing, seed) if missing else cache
        else:
            dataset = self.split(split)
            dataset = NoisyDataset(dataset, noise, seed) if noise else dataset
            dataset = MissingDataset(dataset, missing, seed) if missing else dataset
        cfg, acc = self.train_cfg, self.accelerator
        batch_size = cfg.eval_batch_size or cfg.batch_size
        return evaluate(
            self.module,
            self.comps.task,
            dataset,
            batch_size,
            acc.device,
            acc.autocast,
            reference=self.reference,
            banks=self.banks,
        )

    def reference(self):
        """The examples the run's model was fitted on (train, plus val when it was refitted), for
        metrics that rank against them; from the prefix cache when the run used one."""
        names = ["train", "val"] if self.train_cfg.refit and "val" in self.comps.reader.splits else ["train"]
        parts = []
        for name in names:
            cache = self.cached(name)
            parts.append(self.split(name) if cache is None else cache)
        return join_splits(parts)


def join_splits(parts: list):
    """Split datasets, or prefix caches of one step, as one source in order (one part: itself)."""
    if len(parts) == 1:
        return parts[0]
    return PrefixCache.concat(parts) if isinstance(parts[0], PrefixCache) else ConcatDataset(parts)


def cache_with_missing(cache: PrefixCache, rates: dict[str, float], seed: int) -> PrefixCache:
    """The cached split with modalities removed at ``rates``: the same draws as ``MissingDataset``."""
    marks = {m: list(cache.absent.get(m) or [False] * len(cache)) for m in cache.rows}
    for i in range(len(cache)):
        had = [m for m in cache.rows if cache.rows[m][i] is not None and not marks[m][i]]
        for m in drawn_missing(i, had, rates, seed):
            marks[m][i] = True
    return cache.with_changes(absent=marks)


def evaluate_run(
    run_dir: str, split: str = "test", noise: dict | None = None, seed: int = 0, missing: dict | None = None
) -> dict[str, float]:
    """Rebuild a finished run and score ``split`` (see ``RunEvaluator.score``)."""
    return RunEvaluator(run_dir).score(split, noise=noise, missing=missing, seed=seed)
