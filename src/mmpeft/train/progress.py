"""Progress bars for training, prefix caching and evaluation: shown on a terminal, by the main
process only (under torchrun every rank would draw its own), and silent in logs and pipes."""

from __future__ import annotations

import sys

from ..distributed import is_main_process


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0):
    from tqdm.auto import tqdm

    show = enabled and is_main_process() and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not show, leave=False, dynamic_ncols=True)
