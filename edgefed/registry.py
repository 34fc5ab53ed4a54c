"""Name -> implementation registries, filled by decorators (peft's `register_peft_method` pattern).

Adding a method or an aggregator is one new module in its package: the package imports every
module it holds, and each module registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

from edgefed.errors import EdgefedError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named set of factories of one kind ("method", "aggregator", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[[], T]] = {}

    def register(self, name: str) -> Callable[[Callable[[], T]], Callable[[], T]]:
        def decorate(factory: Callable[[], T]) -> Callable[[], T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = factory
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._factories)

    def create(self, name: str) -> T:
        if name not in self._factories:
            raise EdgefedError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        return self._factories[name]()


def import_submodules(package_name: str, package_path: list[str]) -> None:
    """Import every module of a package so that their registration decorators run."""
    for module in pkgutil.iter_modules(package_path):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package_name}.{module.name}")
