"""The trainer (DESIGN §1, §5, §6): Hugging Face Accelerate, AdamW on the trainable parameters only.

One ``Trainer(config, output_dir).fit()`` trains with warm-up + cosine decay, gradient clipping
and accumulation, evaluates on the validation split after every epoch (early stopping, model
selection on ``task.primary``), scores the test split once with the best adapter, and writes::

    <output>/config.yaml      the resolved run config
    <output>/metrics.json     parameters, peak memory, time, throughput, val and test metrics
    <output>/adapter/         the best adapter (``mmpeft.save_adapter``)
    <output>/checkpoints/     resumable checkpoints (``resume=True`` continues a killed run)
    <output>/tensorboard/     TensorBoard logs

Runs the same on CPU, one GPU, or many processes under ``accelerate launch`` / ``torchrun``.
With ``num_workers=0`` a resumed CPU run ends with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from ..adapter_io import adapter_state_dict, save_adapter
from ..checkpoint import atomic_write_bytes
from ..data.base import DataError
from ..missing import dropout_rates
from ..profiling import peak_memory
from ..report import parameter_counts, trainable_and_total
from ..run_config import check_same_config, dump_yaml, read_yaml
from .batches import epoch_batches
from .cache import PrefixCache, TrainModule, cacheable_step, open_stores
from .checkpointing import load_newest_readable, restore_rng, rng_state, save_checkpoint, to_model_device
from .contribution import modality_contributions
from .evaluation import device_batch, evaluate, forward_options, join_splits, split_loader
from .feature_store import cache_root
from .modality_dropout import drop_modalities
from .optim import build_optimizer, build_scheduler
from .progress import progress_bar
from .setup import build_components, compiled, make_accelerator
from .sharding import average_gradients, fsdp_requested, shard_frozen_blocks

log = logging.getLogger("mmpeft")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and batch."""


class StopTraining(Exception):
    """Raised by ``train.stop_after_steps``: the run ends as if killed (resume it with ``resume=True``)."""


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint must restore."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch: int = 0  # batches of that epoch already consumed
    best: float | None = None
    best_epoch: int = -1
    bad_evals: int = 0
    done: bool = False
    stopped_early: bool = False
    loss_sum: float = 0.0  # this epoch's summed step losses
    loss_steps: int = 0
    samples: int = 0
    step_time: float = 0.0  # seconds inside optimizer steps
    loop_time: float = 0.0  # seconds of the whole training loop, evaluations included
    seq: int = 0  # checkpoint sequence number
    history: list = field(default_factory=list)


class Trainer:
    """Train one run config. ``callbacks``: callables ``fn(trainer, event, state)`` with event
    "step" (after each optimizer step), "eval" (after each evaluation) or "checkpoint"."""

    def __init__(
        self,
        config: dict,
        output_dir: str | None = None,
        *,
        reader=None,
        callbacks=(),
        resume=False,
        refit_of: Trainer | None = None,
    ):
        self.output_dir = output_dir
        self.resume = resume
        # the refit of that run (train.refit): train on train+val with its prefix caches, no selection
        self.refit_of = refit_of
        self.callbacks = list(callbacks)
        comps = build_components(config, reader)
        self.config, self.reader, self.task, self.model = comps.config, comps.reader, comps.task, comps.model
        self.cfg = comps.validated.train
        self.model.backbone.gradient_checkpointing = self.cfg.gradient_checkpointing
        may_skip = any(m.may_skip_params for m in self.model.methods.values())
        may_skip |= self.model.missing.placeholder is not None  # unused in a batch where all is present
        self.modality_dropout = dropout_rates(self.cfg.modality_dropout, self.model.backbone.modalities)
        self.fsdp = fsdp_requested(self.cfg)
        self.accelerator = make_accelerator(self.cfg, find_unused_parameters=may_skip)
        self.generator = torch.Generator()
        self.best_state: dict | None = None
        self.writer = None
        self.cache_step = 0
        self.caches: dict[str, PrefixCache] = {}
        self.progress_label = ""  # prefixes the progress bar (bench: the method and seed)
        self.fitted_on_val = False  # set once a refit (train.refit) has fitted the model on train+val

    # --- setup --------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def path(self, *parts: str) -> str | None:
        return None if self.output_dir is None else os.path.join(self.output_dir, *parts)

    def _check_resumed_config(self) -> None:
        path = self.path("config.yaml")
        if path is not None and self.resume and os.path.isfile(path):
            check_same_config(read_yaml(path), self.config, path)

    def _write_config(self) -> None:
        """Written once the data and model are set up: a run that fails its checks leaves nothing."""
        path = self.path("config.yaml")
        if path is None or not self.is_main:
            return
        train = {**self.config["train"], "stop_after_steps": 0}  # a testing aid, not part of the run
        atomic_write_bytes(path, dump_yaml({**self.config, "train": train}).encode())

    def _split(self, name: str):
        if name not in self.reader.splits:
            return None
        dataset = self.reader.split(name)
        if len(dataset) == 0:
            raise DataError(f"dataset {self.reader.name!r}: split {name!r} is empty")
        return dataset

    def _setup(self) -> None:
        self.reader.check_files()  # a bad file in any split is named now, not after training
        self.train_set = self._split("train")
        if self.train_set is None:
            raise DataError(
                f"dataset {self.reader.name!r} has no 'train' split; it has {list(self.reader.splits)}"
            )
        self.val_set = self._split("val")
        self.test_set = self._split("test") if self.cfg.score_test else None
        if self.refit_of is not None and self.val_set is not None:
            self.train_set = ConcatDataset([self.train_set, self.val_set])
            self.val_set = None
        acc = self.accelerator
        world = acc.num_processes
        self.batches_per_epoch = math.ceil(len(self.train_set) / (self.cfg.batch_size * world))
        accum = self.cfg.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)
        self.total_steps = self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch
        if self.cfg.prefix_cache:
            self.cache_step = cacheable_step(self.model, self.reader)
        self.module = TrainModule(self.model, self.cache_step)
        optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = build_scheduler(optimizer, self.cfg, self.total_steps)
        if self.fsdp:  # no DDP wrapper: frozen blocks are sharded below, the rest averaged by hand
            self.wrapped, self.optimizer = self.module.to(acc.device), acc.prepare(optimizer)
        else:
            self.wrapped, self.optimizer = acc.prepare(self.module, optimizer)
        # what a training step calls: the prepared module, compiled when asked (no_sync stays on wrapped)
        self.step_module = compiled(self.wrapped, self.cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.prefix_cache:
            self._build_caches()
        if self.cfg.head_init == "probe" and not self.closed_form:
            from ..methods.probe import init_head_from_probe

            self.head_init_info = init_head_from_probe(self)
            log.info("head initialised by the probe: alpha %g, val %s", self.head_init_info["alpha"],
                     fmt(self.head_init_info["val"]))  # fmt: skip
        if self.fsdp and not self.closed_form:  # after the cache and the probe fit, which run blocks alone
            self.fsdp_info = shard_frozen_blocks(self.model)

    def _build_caches(self) -> None:
        """States of the frozen prefix for every split, through the shared on-disk store.

        The main process computes what the store lacks first; the others then only read it."""
        t0 = time.perf_counter()
        parent = self.refit_of
        if parent is not None and parent.caches and parent.cache_step == self.cache_step:
            self.caches = {"train": PrefixCache.concat([parent.caches["train"], parent.caches["val"]])}
            none = {"build_time_s": 0.0, "computed_items": 0, "continued_items": 0}
            self.cache_info = {**parent.cache_info, **none}
            return
        acc = self.accelerator
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        root = cache_root(self.cfg.cache_dir)
        precision = str(acc.mixed_precision)  # states computed under bf16 autocast differ
        stores = open_stores(self.model, self.cache_step, root, precision)
        computed = continued = 0
        with acc.main_process_first():
            for name, dataset in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set)):
                if dataset is None:
                    continue
                self.caches[name] = PrefixCache.build(
                    self.model, dataset, self.cache_step, bs, acc.device, acc.autocast, stores
                )
                computed += self.caches[name].computed
                continued += self.caches[name].continued
        mb = sum(c.nbytes() for c in self.caches.values()) / 2**20
        self.cache_info = {
            "step": self.cache_step,
            "size_mb": mb,
            "build_time_s": time.perf_counter() - t0,
            "computed_items": computed,
            "continued_items": continued,  # computed from stored states of an earlier block
            "store": root or "memory",
        }
        log.info(
            "prefix cache: states at step %d, %.1f MB, %d input(s) computed, %.1f s (%s)",
            self.cache_step,
            mb,
            computed,
            self.cache_info["build_time_s"],
            root or "in memory",
        )

    # --- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train, select the best epoch on validation, score the test split once; returns metrics."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._check_resumed_config()
        self._setup()
        self._write_config()
        state = TrainState()
        if self.closed_form:
            self._fit_closed_form(state)
            return self._finish(state)
        if self.resume:
            self._restore(state)
        self._open_writer()
        try:
            while not state.done:
                started = time.perf_counter()
                self._run_epoch(state, started)
        finally:
            if self.writer is not None:
                self.writer.close()
        if self.cfg.refit and self.val_set is not None:
            return self._refit(state)
        return self._finish(state)

    @property
    def closed_form(self) -> bool:
        """A method fitted in closed form (``probe``) replaces the gradient loop."""
        return any(getattr(m, "closed_form", False) for m in self.model.methods.values())

    def _fit_closed_form(self, st: TrainState) -> None:
        from ..methods.probe import fit_closed_form

        t0 = time.perf_counter()
        st.history = fit_closed_form(self)
        chosen = next((h for h in st.history if h.get("chosen")), st.history[-1])
        st.best, st.best_epoch = chosen["val"].get(self.task.primary), chosen["epoch"]
        st.epoch, st.done = len(st.history), True
        st.loop_time = time.perf_counter() - t0
        self.best_state = None  # the model holds the chosen fit (refitted on train+val with train.refit)
        self.fitted_on_val = self.cfg.refit and self.val_set is not None
        for h in st.history:
            log.info(
                "probe alpha %g: val %s%s", h["alpha"], fmt(h["val"]), " (chosen)" if h.get("chosen") else ""
            )

    def _refit(self, st: TrainState) -> dict[str, Any]:
        """train.refit: train afresh on train+val for the epoch count chosen on val, then score test."""
        epochs = st.best_epoch + 1
        log.info("refit: training on train+val for %d epoch(s), the best on val", epochs)
        train = {**self.config["train"], "epochs": epochs, "max_steps": 0, "patience": 0, "refit": False,
                 "score_test": False}  # fmt: skip
        if getattr(self, "head_init_info", None):  # the refit starts from the probe with the chosen alpha
            train["head_init_alphas"] = [self.head_init_info["alpha"]]
        config = {**self.config, "train": train}
        refit = Trainer(config, None, reader=self.reader, refit_of=self)
        t0 = time.perf_counter()
        result = refit.fit()
        weights = adapter_state_dict(refit.model)
        self.model.load_state_dict(to_model_device(weights, self.accelerator.device), strict=False)
        self.best_state = None
        self.fitted_on_val = True
        self.refit_info = {"epochs": epochs, "train_examples": len(refit.train_set),
                           "train_time_s": time.perf_counter() - t0, "steps": result["steps"]}  # fmt: skip
        return self._finish(st)

    def _run_epoch(self, st: TrainState, started: float) -> None:
        accum = self.cfg.gradient_accumulation_steps
        acc = self.accelerator
        batches = epoch_batches(
            len(self.train_set), self.cfg.batch_size, seed=self.cfg.seed, epoch=st.epoch,
            rank=acc.process_index, world=acc.num_processes,
        )  # fmt: skip
        if st.batch == 0:
            self.generator.manual_seed(self.cfg.seed * 1_000_003 + st.epoch)
        source = self.caches.get("train", self.train_set)
        loader = split_loader(
            source, batches[st.batch :], self.model.backbone.encoders, self.cfg.num_workers, self.generator
        )
        it = iter(loader)
        bar = self._progress(st)
        self.module.train()
        while st.batch < len(batches) and not self._out_of_steps(st):
            micro = [next(it) for _ in range(min(accum, len(batches) - st.batch))]
            self._optimizer_step(micro, st)
            bar.update(1)
            rate = st.samples / max(st.step_time, 1e-9)
            bar.set_postfix(loss=f"{st.loss_sum / max(1, st.loss_steps):.4f}", samples_per_s=f"{rate:.0f}")
            self._after_step(st, started)
            started = time.perf_counter()
        bar.close()
        self._end_epoch(st, started)

    def _out_of_steps(self, st: TrainState) -> bool:
        return bool(self.cfg.max_steps) and st.step >= self.cfg.max_steps

    def _optimizer_step(self, micro: list[dict], st: TrainState) -> None:
        acc = self.accelerator
        t0 = time.perf_counter()
        step_loss = 0.0
        modalities = self.model.backbone.modalities
        for j, batch in enumerate(micro):
            sync = j == len(micro) - 1
            with nullcontext() if sync else acc.no_sync(self.wrapped):
                seed = [self.cfg.seed, st.epoch, st.batch + j, acc.process_index]
                batch = device_batch(
                    drop_modalities(batch, self.modality_dropout, modalities, seed), acc.device
                )
                with acc.autocast():
                    outputs = self.step_module(batch["inputs"], **forward_options(batch))
                    loss = self.task.loss(outputs, batch)
                step_loss += self._checked_loss(loss, st, st.batch + j, batch) / len(micro)
                acc.backward(loss / len(micro))
            st.samples += len(batch["targets"]) * acc.num_processes
        if self.fsdp:
            average_gradients(self.params)
        if self.cfg.grad_clip > 0:
            acc.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        st.batch += len(micro)
        st.loss_sum += step_loss
        st.loss_steps += 1
        st.step_time += time.perf_counter() - t0
        if self.writer is not None and st.step % self.cfg.log_every_steps == 0:
            self.writer.add_scalar("train/loss", step_loss, st.step)
            self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], st.step)

    def _checked_loss(self, loss: torch.Tensor, st: TrainState, batch_index: int, batch: dict) -> float:
        """The loss averaged over processes; a non-finite loss on any process stops every process."""
        acc = self.accelerator
        value = loss.detach().float().reshape(())
        bad = not bool(torch.isfinite(value))
        where, mean = "the only process", float(value)
        if acc.num_processes > 1:  # every process must stop together, or the others hang
            packed = torch.stack(
                [torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0), value.new_tensor(float(bad))]
            )
            total = acc.reduce(packed, reduction="sum")
            where = f"process {acc.process_index}" if bad else "another process"
            bad, mean = bad or bool(total[1] > 0), float(total[0]) / acc.num_processes
        if bad:
            raise TrainingError(
                f"non-finite loss ({float(value)}) at step {st.step + 1} (epoch {st.epoch}, batch {batch_index} "
                f"of the epoch counting from 0, on {where}; example ids {list(batch['ids'])[:8]}); "
                "lower train.lr, check the data, or set train.grad_clip"
            )
        return mean

    def _after_step(self, st: TrainState, started: float) -> None:
        st.loop_time += time.perf_counter() - started
        self._emit("step", st)
        every = self.cfg.checkpoint_every_steps
        if every and st.step % every == 0:
            self._save_checkpoint(st)
        if self.cfg.stop_after_steps and st.step >= self.cfg.stop_after_steps:
            raise StopTraining(f"stopped after {st.step} steps (train.stop_after_steps)")

    def _end_epoch(self, st: TrainState, started: float) -> None:
        """Evaluate, select, decide whether to go on, checkpoint."""
        metrics = self._evaluate_val() if self.val_set is not None else {}
        record = {
            "epoch": st.epoch,
            "step": st.step,
            "train_loss": st.loss_sum / max(1, st.loss_steps),
            "val": metrics,
        }
        st.history.append(record)
        self._select(st, metrics)
        log.info(
            "epoch %d step %d: train_loss %.4f val %s", st.epoch, st.step, record["train_loss"], fmt(metrics)
        )
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"val/{k}", v, st.step)
        st.epoch += 1
        st.batch, st.loss_sum, st.loss_steps = 0, 0.0, 0
        patience_out = self.cfg.patience and st.bad_evals >= self.cfg.patience
        st.stopped_early = bool(patience_out)
        out_of_epochs = not self.cfg.max_steps and st.epoch >= self.cfg.epochs
        st.done = bool(patience_out or self._out_of_steps(st) or out_of_epochs)
        st.loop_time += time.perf_counter() - started
        self._emit("eval", st)
        self._save_checkpoint(st)

    def _evaluate_val(self) -> dict[str, float]:
        source = self.caches.get("val", self.val_set)
        return self._evaluate(source)

    def _evaluate(self, source) -> dict[str, float]:
        acc = self.accelerator
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        return evaluate(
            self.module,
            self.task,
            source,
            bs,
            acc.device,
            acc.autocast,
            self.cfg.num_workers,
            self._reference,
        )

    def _reference(self):
        """The examples the model was fitted on, for metrics that rank against them (retrieval's
        hubness correction): train, or train+val once a refit has trained on both."""
        parts = [self.caches.get("train", self.train_set)]
        if self.fitted_on_val:
            parts.append(self.caches.get("val", self.val_set))
        return join_splits(parts)

    def _select(self, st: TrainState, metrics: dict[str, float]) -> None:
        """Keep the adapter of the best validation score (the last one without a val split)."""
        primary = self.task.primary
        if metrics and primary not in metrics:
            raise TrainingError(
                f"task {self.task.name!r}: primary metric {primary!r} not in {sorted(metrics)}"
            )
        value = metrics.get(primary)
        better = (
            value is None
            or st.best is None
            or (value > st.best if self.task.higher_is_better else value < st.best)
        )  # fmt: skip
        if better:
            st.best, st.best_epoch, st.bad_evals = value, st.epoch, 0
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in adapter_state_dict(self.model).items()
            }
        else:
            st.bad_evals += 1

    def _emit(self, event: str, st: TrainState) -> None:
        for callback in self.callbacks:
            callback(self, event, st)

    # --- progress and logs ---------------------------------------------------------------------
    def _progress(self, st: TrainState):
        first = st.batch // self.cfg.gradient_accumulation_steps
        desc = f"{self.progress_label} epoch {st.epoch}".strip()
        return progress_bar(self.steps_per_epoch, desc, self.cfg.progress and self.is_main, first)

    def _open_writer(self) -> None:
        if not (self.cfg.tensorboard and self.is_main and self.output_dir):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed (pip install 'mmpeft[train]'); no TensorBoard logs")
            return
        self.writer = SummaryWriter(self.path("tensorboard"))

    # --- checkpoints -----------------------------------------------------------------------------
    def _save_checkpoint(self, st: TrainState) -> None:
        if not self.cfg.checkpoint or self.output_dir is None:
            return
        st.seq += 1
        if self.is_main:
            state = {
                "loop": dataclasses.asdict(st),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(self.generator),
                "world_size": self.accelerator.num_processes,
            }
            if self.accelerator.scaler is not None:
                state["scaler"] = self.accelerator.scaler.state_dict()
            weights = adapter_state_dict(self.model)
            save_checkpoint(
                self.path("checkpoints"), st.seq, state, weights, self.best_state, self.cfg.keep_checkpoints
            )
        self.accelerator.wait_for_everyone()
        self._emit("checkpoint", st)

    def _restore(self, st: TrainState) -> None:
        loaded = load_newest_readable(self.path("checkpoints")) if self.output_dir else None
        if loaded is None:
            log.warning("resume: no checkpoint under %s; starting from scratch", self.path("checkpoints"))
            return
        path, state, weights, best = loaded
        if state["world_size"] != self.accelerator.num_processes:
            raise TrainingError(
                f"{path} was written by {state['world_size']} processes; resume with the same number "
                f"(now {self.accelerator.num_processes})"
            )
        for k, v in state["loop"].items():
            setattr(st, k, v)
        self.model.load_state_dict(to_model_device(weights, self.accelerator.device), strict=False)
        self.best_state = best
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], self.generator)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, st.step, st.epoch, st.batch)

    # --- the end ---------------------------------------------------------------------------------
    def _finish(self, st: TrainState) -> dict[str, Any]:
        """Load the best adapter, score the test split once, save adapter and metrics."""
        if self.best_state is not None:
            self.model.load_state_dict(
                to_model_device(self.best_state, self.accelerator.device), strict=False
            )
        t0 = time.perf_counter()
        test = self._evaluate(self.caches.get("test", self.test_set)) if self.test_set is not None else {}
        log.info("test (best epoch %d): %s", st.best_epoch, fmt(test))
        replaced = self._contributions() if test else None
        metrics = self._metrics(st, test, time.perf_counter() - t0)
        metrics["test_replaced"] = replaced
        if self.is_main and self.output_dir is not None:
            save_adapter(self.model, self.path("adapter"))
            atomic_write_bytes(self.path("metrics.json"), json.dumps(metrics, indent=2).encode())
        self.accelerator.wait_for_everyone()
        return metrics

    def _contributions(self) -> dict[str, dict] | None:
        """Test metrics with each modality's input replaced by another example's (see contribution)."""
        modalities = self.model.backbone.modalities
        if not self.cfg.modality_contribution or len(modalities) < 2 or self.task.name == "retrieval":
            return None
        out = modality_contributions(self._evaluate, self.caches.get("test", self.test_set), modalities)
        primary = self.task.primary
        log.info("test %s with one modality replaced: %s", primary,
                 ", ".join(f"{m} {v[primary]:.4f}" for m, v in out.items()))  # fmt: skip
        return out

    def _metrics(self, st: TrainState, test: dict, test_time: float) -> dict[str, Any]:
        trainable, total = trainable_and_total(self.model)
        memory, kind = peak_memory()
        best = next((h["val"] for h in st.history if h["epoch"] == st.best_epoch), {})
        return {
            "methods": [m.name for m in self.model.methods.values()],
            "task": self.task.name,
            "primary": self.task.primary,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100.0 * trainable / max(1, total),
            "parameters": parameter_counts(self.model),
            "peak_memory_mb": memory,
            "peak_memory_kind": kind,
            "train_time_s": st.loop_time,
            "step_time_s": st.step_time / max(1, st.step),
            "samples_per_s": st.samples / max(st.step_time, 1e-9),
            "test_time_s": test_time,
            "steps": st.step,
            "epochs": st.epoch,
            "best_epoch": st.best_epoch,
            "stopped_early": st.stopped_early,
            "world_size": self.accelerator.num_processes,
            # how the processes share the work: NO, MULTI_CPU / MULTI_GPU (DDP), FSDP, DEEPSPEED
            "distributed_type": str(self.accelerator.distributed_type).rsplit(".", 1)[-1],
            "fsdp": getattr(self, "fsdp_info", None),  # frozen blocks sharded (train.fsdp)
            "prefix_cache": getattr(self, "cache_info", None),
            "refit": getattr(self, "refit_info", None),
            "head_init": getattr(self, "head_init_info", None),
            "val": best,
            "test": test,
            "history": st.history,
        }


def fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "-"
