"""Name -> implementation registries, filled by decorators (peft's `register_peft_method` pattern).

Adding a method or an aggregator is one new module in its package: the package imports every
module it holds, and each module registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from edgefed.errors import EdgefedError

if TYPE_CHECKING:
    from edgefed.settings import Settings

T = TypeVar("T")


class Registry(Generic[T]):
    """A named set of components of one kind ("method", "aggregator", ...): classes built with their
    settings (`edgefed.settings.Configurable`)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorate(factory: type[T]) -> type[T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = factory
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._factories)

    def settings_type(self, name: str) -> type[Settings]:
        """The type of the settings the component `name` is built with."""
        return self._factory(name).settings_type

    def create(self, name: str, settings: Settings | None = None) -> T:
        """The component `name`, built with `settings` (None: its defaults)."""
        return self._factory(name)(settings)

    def _factory(self, name: str) -> Any:
        if name not in self._factories:
            raise EdgefedError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}")
        return self._factories[name]


def lazy_package(package: str, path: list[str], base: str, names: list[str]) -> Callable[[str], Any]:
    """A package's `__getattr__` (PEP 562) that imports its modules, registering them, when one of
    `names` (attributes of its module `base`) is first read: until then its light modules (settings)
    import without the heavy ones (torch)."""

    def getattr_(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import_submodules(package, path)
        module = importlib.import_module(f"{package}.{base}")
        exported = {item: getattr(module, item) for item in names}
        vars(importlib.import_module(package)).update(exported)  # read once, then plain attributes
        return exported[name]

    return getattr_


def import_submodules(package_name: str, package_path: list[str]) -> None:
    """Import every module of a package so that their registration decorators run."""
    for module in pkgutil.iter_modules(package_path):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package_name}.{module.name}")
