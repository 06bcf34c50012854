"""Measuring one training step: time, activation memory kept for backward, peak memory.

Used by the benchmark scripts and the trainer's reports. On CUDA, peak memory is
``torch.cuda.max_memory_allocated``. On CPU there is no allocator high-water mark, so we report
the bytes of tensors autograd saves for the backward pass (exact and deterministic: the part of
training memory that parameter-efficient methods and the no-grad prefix change) and the growth
of the process's resident-set high-water mark during the step (coarse).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch


def rss_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def peak_memory() -> tuple[float, str]:
    """(MB, what was measured): CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    return rss_peak_mb(), "cpu_ru_maxrss"


class SavedTensorMeter:
    """Sums the bytes of distinct tensors autograd saves for backward inside the context
    (weights, i.e. the storages of ``params``, are not activations and are not counted)."""

    def __init__(self, params=()):
        self.bytes = 0
        self._seen: set[int] = {p.untyped_storage().data_ptr() for p in params}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def measure_train_step(
    step: Callable[[], torch.Tensor], params=(), repeats: int = 5, device: str = "cpu"
) -> dict:
    """Run ``step`` (forward + backward + optimizer step, returns the loss) ``repeats`` + 1 times.

    Returns median step time (the first, warm-up run excluded), the activation bytes saved for
    backward in one step, and peak memory (CUDA allocator peak, or CPU RSS growth).
    """
    cuda = device.startswith("cuda")
    rss_before = rss_peak_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with SavedTensorMeter(params) as saved:
        step()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_peak_mb() - rss_before
    return {
        "step_time_s": statistics.median(times),
        "saved_activations_mb": saved.bytes / 2**20,
        "peak_memory_mb": peak,
        "peak_memory_kind": "cuda_max_allocated" if cuda else "cpu_rss_growth",
    }
