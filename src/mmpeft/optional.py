"""Lazy imports of optional backbones: a missing package names the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module!r} is needed here; install it with: pip install 'mmpeft[{extra}]'") from e
