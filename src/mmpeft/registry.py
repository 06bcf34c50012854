"""One registry per plug-in kind (methods, encoders, datasets, tasks).

A plug-in registers itself with a decorator; the CLI, the configs, the docs checks and the
parametrised tests all read the registry, so adding a plug-in is one file.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A human hint listing the valid names closest to ``name`` (or all of them if none is close)."""
    choices = sorted(choices)
    near = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    near += [c for c in choices if c not in near and (c.startswith(name) or name.startswith(c))][
        : n - len(near)
    ]
    if near:
        return "did you mean " + " or ".join(repr(c) for c in near) + "?"
    return "valid names: " + ", ".join(choices)


class Registry(Generic[T]):
    """Name -> plug-in map with a registering decorator and helpful lookup errors."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package  # modules of this package are imported on first lookup
        self._items: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            if isinstance(obj, type) and not getattr(obj, "name", None):
                obj.name = name
            return obj

        return decorate

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; {closest(name, self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())


METHODS: Registry = Registry("method", "mmpeft.methods")
ENCODERS: Registry = Registry("encoder", "mmpeft.encoders")
DATASETS: Registry = Registry("dataset", "mmpeft.data")
TASKS: Registry = Registry("task", "mmpeft.tasks")

register_method = METHODS.register
register_encoder = ENCODERS.register
register_dataset = DATASETS.register
register_task = TASKS.register
