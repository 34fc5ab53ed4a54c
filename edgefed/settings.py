"""Settings: a component's own options (peft's per-method `LoraConfig` is the model), declared as a
frozen dataclass of `option()` fields next to the component and checked by it.

A run's configuration composes them (edgefed/config.py): each field is a key of config.toml and a
`--flag` of `edgefed run`, written once here with its default and help. Keys are one flat namespace,
so the components that share a key (`rank`) share its meaning; `edgefed.components` checks that.
Nothing here imports torch: the command line builds its flags from these classes.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgefed.errors import EdgefedError

# The most clients (and fleet devices) a run takes: beyond it a typo, not a fleet (and memory for it).
MAX_CLIENTS = 100_000
# The most of any count a run repeats (rounds, local steps): beyond it a typo that would never end.
MAX_COUNT = 1_000_000


def option(default: Any, help: str, metavar: str | None = None, example: str | None = None) -> Any:
    """A settings field: its default and help text in one place (`edgefed run --help` is built from
    them). A list field names an `example` for its errors (`query,value`)."""
    return field(default=default, metadata={"help": help, "metavar": metavar, "example": example})


def key_of(name: str) -> str:
    """The TOML key and flag name of a field: `local_steps` -> `local-steps`."""
    return name.replace("_", "-")


# TOML's integers are 64-bit: a run's config.toml records no larger one (nor reads it back elsewhere).
MIN_INT, MAX_INT = -(2**63), 2**63 - 1


def shown(value: Any) -> str:
    """`value` as an error quotes it: its repr, or what it is where it has none (an integer past
    `sys.get_int_max_str_digits` digits)."""
    try:
        return repr(value)
    except ValueError:
        return "a number too long to show"


def check_text(name: str, text: str) -> None:
    """Refuse text that no setting holds: a NUL (no path or name has one) or an unpaired surrogate (a
    file name's non-UTF-8 bytes, which config.toml, UTF-8, cannot record)."""
    if "\x00" in text:
        raise EdgefedError(f"{key_of(name)}: a NUL character in {shown(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgefedError(f"{key_of(name)}: {shown(text)} is not UTF-8 text") from None


def coerce(name: str, kind: Any, value: Any, example: str | None = None) -> Any:
    """`value` checked against a field's type `kind` (TOML and flags both land here); a list field
    (`tuple[str, ...]`) also takes comma-separated text."""
    if value is None:
        return None
    kinds = set(typing.get_args(kind)) or {kind}
    if typing.get_origin(kind) is tuple or any(typing.get_origin(k) is tuple for k in kinds):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(
            isinstance(item, str) and item.strip() for item in items
        ):
            raise EdgefedError(f"{key_of(name)}: expected names like '{example}'")
        for item in items:
            check_text(name, item)
        return tuple(item.strip() for item in items)
    if bool in kinds:
        if not isinstance(value, bool):
            raise EdgefedError(f"{key_of(name)}: expected true or false, got {shown(value)}")
        return value
    if int in kinds:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EdgefedError(f"{key_of(name)}: expected an integer, got {shown(value)}")
        if not MIN_INT <= value <= MAX_INT:
            raise EdgefedError(
                f"{key_of(name)}: expected an integer within TOML's 64-bit range, got {shown(value)}"
            )
        return value
    if float in kinds:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EdgefedError(f"{key_of(name)}: expected a number, got {shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer past the largest float
            number = math.inf
        if not math.isfinite(number):  # NaN passes every comparison's `else`: refused here, once
            raise EdgefedError(f"{key_of(name)}: expected a finite number, got {shown(value)}")
        return number
    if not isinstance(value, str):
        raise EdgefedError(f"{key_of(name)}: expected a string, got {shown(value)}")
    if not value.strip():  # no name or path is blank: `--out ""` would be the working folder
        raise EdgefedError(f"{key_of(name)}: expected a name or path, got {shown(value)}")
    check_text(name, value)
    return value


def check_positive(**values: float | None) -> None:
    """Refuse any of `values` that is given and not a positive finite number, naming its key."""
    for name, value in values.items():
        if value is not None and not 0 < value < math.inf:
            raise EdgefedError(f"{key_of(name)} must be positive, got {value}")


def check_at_most(limit: float, **values: float | None) -> None:
    """Refuse any of `values` that is given and over `limit`, naming its key."""
    for name, value in values.items():
        if value is not None and value > limit:
            raise EdgefedError(f"{key_of(name)} must be at most {limit:,}, got {value:,}")


@dataclass(frozen=True)
class Settings:
    """A component's settings. Subclasses add `option()` fields and refuse nonsense in `check`."""

    def check(self) -> None:
        """Raise an EdgefedError naming the key of a value this component cannot use."""

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {item.name: item for item in dataclasses.fields(cls)}

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Settings:
        """Settings from field-named values (missing ones take their defaults), coerced and checked."""
        kinds = typing.get_type_hints(cls)
        declared = cls.fields()
        settings = cls(
            **{
                name: coerce(name, kinds[name], value, declared[name].metadata["example"])
                for name, value in values.items()
            }
        )
        settings.check()
        return settings

    def values(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class NoSettings(Settings):
    """A component with no settings of its own."""


class Configurable:
    """A registered component built with its settings (`Registry.create(name, settings)`): the class
    declares their type, and an instance holds them checked, the type's defaults when none are given."""

    settings_type: ClassVar[type[Settings]] = NoSettings

    def __init__(self, settings: Settings | None = None) -> None:
        settings = self.settings_type() if settings is None else settings
        if type(settings) is not self.settings_type:
            raise TypeError(f"{type(self).__name__} takes {self.settings_type.__name__}, got {settings!r}")
        settings.check()
        self.settings = settings
