"""One registry type for every extension point (models, strategies, export specs, artifact
builders, backends): a duplicate name raises at import time, and an unknown name raises the
extension point's own error listing the valid names.

    BACKENDS: Registry[BackendSpec] = Registry("backend", BackendError, extra_names=("auto",))
    BACKENDS.add("cpu", spec)       # ValueError when 'cpu' is taken
    BACKENDS.get("cuda")            # BackendError: unknown backend 'cuda'; valid: cpu, auto
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[Exception], *, prefix: str = "", extra_names: tuple[str, ...] = (),
                 sort_names: bool = False):
        self.kind = kind  # "backend", "strategy", ...: named in messages
        self.error = error  # raised for an unknown name
        self.prefix = prefix  # e.g. "adapt.strategy: ", naming the config field the name came from
        self.extra_names = extra_names  # accepted names handled outside the registry (e.g. 'auto'); never registrable
        self.sort_names = sort_names
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items or name in self.extra_names:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = item
        return item

    def names(self) -> list[str]:
        names = sorted(self._items) if self.sort_names else list(self._items)
        return [*names, *self.extra_names]

    def get(self, name: str) -> T:
        if name not in self._items:
            raise self.error(f"{self.prefix}unknown {self.kind} '{name}'; valid: {', '.join(self.names())}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def values(self) -> list[T]:
        return list(self._items.values())
