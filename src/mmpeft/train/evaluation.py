"""Evaluation: one pass over a split with the task's meter; ``evaluate_run`` re-scores a saved run."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch

from ..adapter_io import load_adapter
from ..data.base import DataError, collate_examples
from ..data.perturb import NoisyDataset
from ..run_config import read_yaml
from .batches import IndexDataset, make_loader, sequential_batches, to_device
from .cache import PrefixCache, TrainModule
from .progress import progress_bar
from .setup import build_components, make_accelerator


def split_loader(source, batches: list[list[int]], encoders, num_workers: int = 0, generator=None):
    """A DataLoader over a dataset (collated by the encoders) or over a prefix cache."""
    if isinstance(source, PrefixCache):
        return make_loader(IndexDataset(len(source)), batches, source.collate, 0, generator)
    collate = partial(collate_examples, encoders=encoders)
    return make_loader(source, batches, collate, num_workers, generator)


def device_batch(batch: dict[str, Any], device) -> dict[str, Any]:
    return {**batch, "inputs": to_device(batch["inputs"], device)}


@torch.no_grad()
def evaluate(module: TrainModule, task, source, batch_size: int, device, autocast, num_workers=0) -> dict:
    """Metrics of ``task`` over every example of ``source`` (a split dataset or a prefix cache).

    Every meter gets the model first (``bind_model``): it may run it again when
    computing (the retrieval task's ITM re-ranking); ``compute`` runs in eval mode under autocast."""
    was_training = module.training
    module.eval()
    meter = task.meter()
    meter.bind_model(module.model)
    batches = sequential_batches(len(source), batch_size)
    # a private generator: evaluating never draws from the global RNG (resumed runs stay exact)
    loader = split_loader(source, batches, module.model.backbone.encoders, num_workers, torch.Generator())
    bar = progress_bar(len(batches), "evaluating")
    try:
        for batch in loader:
            bar.update(1)
            batch = device_batch(batch, device)
            with autocast():
                outputs = module(batch["inputs"], cached=batch.get("cached", False), ids=batch.get("ids"))
            meter.update(outputs, batch)
        with autocast():
            metrics = meter.compute()
    finally:
        bar.close()
        module.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


def evaluate_run(
    run_dir: str, split: str = "test", noise: dict[str, float] | None = None, seed: int = 0
) -> dict[str, float]:
    """Rebuild a finished run from ``run_dir/config.yaml`` + ``run_dir/adapter`` and score ``split``;
    ``noise`` ({modality: level}) adds Gaussian noise to those raw inputs (``data.perturb``)."""
    config_file = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{run_dir!r} has no config.yaml; is it the --output of `mmpeft train`?")
    comps = build_components(read_yaml(config_file))
    load_adapter(comps.model, os.path.join(run_dir, "adapter"))
    train_cfg = comps.validated.train
    accelerator = make_accelerator(train_cfg)
    module = TrainModule(comps.model).to(accelerator.device)
    if split not in comps.reader.splits:
        raise DataError(
            f"dataset {comps.reader.name!r} has no split {split!r}; it has {list(comps.reader.splits)}"
        )
    dataset = comps.reader.split(split)
    if noise:
        unknown = sorted(set(noise) - set(comps.model.backbone.modalities))
        if unknown:
            raise DataError(
                f"--noise names {unknown}, which the model of {run_dir!r} does not have; it has "
                f"{comps.model.backbone.modalities}"
            )
        dataset = NoisyDataset(dataset, noise, seed)
    batch_size = train_cfg.eval_batch_size or train_cfg.batch_size
    return evaluate(module, comps.task, dataset, batch_size, accelerator.device, accelerator.autocast)
