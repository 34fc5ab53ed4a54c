"""The aggregators' settings, kept apart from their torch code so that `edgefed run --help` builds
their flags without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from edgefed.errors import EdgefedError
from edgefed.settings import Settings, option


@dataclass(frozen=True)
class TrimSettings(Settings):
    """The trimmed mean: the share of clients dropped at each end, per coordinate."""

    trim_fraction: float = option(
        0.2, "trimmed-mean: share of the clients' values dropped at each end of every coordinate"
    )

    def check(self) -> None:
        if not 0 <= self.trim_fraction < 0.5:
            raise EdgefedError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")


AGGREGATOR_SETTINGS: tuple[type[Settings], ...] = (TrimSettings,)
