"""A progress bar over in-process local training steps."""

from __future__ import annotations

import sys

from tqdm import tqdm

from edgefed.config import RunConfig


class StepProgress:
    """A progress bar over in-process local training steps on a terminal (silent elsewhere: the table
    and, over gRPC, the clients' own logs suffice)."""

    def __init__(self, config: RunConfig) -> None:
        per_round = max(1, round(config.sample_fraction * config.clients))
        total = config.rounds * per_round * config.local_steps if config.local_steps else None
        self.rounds = config.rounds
        self.bar = tqdm(
            total=total,
            unit="step",
            desc="local training",
            leave=False,
            file=sys.stderr,
            disable=None if config.transport == "inproc" else True,
        )

    def step(self, round_number: int, client: int, loss: float) -> None:
        self.bar.set_postfix_str(
            f"round {round_number}/{self.rounds} client {client} loss {loss:.3f}", refresh=False
        )
        self.bar.update()

    def writer(self, echo):
        """Where table lines go: above the bar while it is shown."""
        return echo if self.bar.disable else lambda line: self.bar.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
