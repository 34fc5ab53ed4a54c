"""The simulated device clock: how long a round would take if each client were its device profile.

Always labelled simulated: nothing here is measured on a device, and nothing here is measured on
this machine either, so equal work gives equal simulated time whatever the host's load. Per round,
for each client k that returned an update (the model of a step is edgefed/devices/costmodel.py's):

    client_k = steps_k · step_s(plan_k, profile_k) + profile_k.transfer_s(bytes down to k, bytes up from k)
    round    = max_k client_k, or the deadline when a `deadline` fleet dropped a client that missed it
    energy_k = profile_k.power_w · client_k   (the power mode's budget: an upper bound; where it is known)

The server's aggregation is not a device's work: it is in the measured columns (wall), not here. The
round's critical path is its slowest client, so a straggler shows in simulated time-to-accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefed.devices.fleet import FleetPlans
from edgefed.devices.power import simulated_energy_j
from edgefed.types import RoundMetrics, RoundResult

LABEL = "simulated device clock"


@dataclass
class SimulatedRound:
    seconds: float  # the round's critical path
    client_s: dict[int, float]  # each client's simulated compute plus transfer
    slowest: int | None
    client_j: dict[int, float]  # each client's simulated energy, where its profile has a power figure


class SimulatedClock:
    def __init__(self, fleet: FleetPlans) -> None:
        self.fleet = fleet

    def client_seconds(self, slot: int, steps: int, bytes_down: int, bytes_up: int) -> float:
        plan = self.fleet.plan(slot)
        if plan is None:
            raise ValueError(f"client {slot} has no device profile: the simulated clock cannot time it")
        return steps * plan.step_s + self.transfer_s(slot, bytes_down, bytes_up)

    def transfer_s(self, slot: int, bytes_down: int, bytes_up: int) -> float:
        """The client's transfers over its device's link."""
        return self.fleet.profile_for(slot).transfer_s(bytes_down, bytes_up)

    def late(self, slots: list[int]) -> list[int]:
        """The clients a `deadline` fleet drops: their plan's predicted round exceeds the budget."""
        return [slot for slot in slots if self.fleet.misses_deadline(slot)]

    def round(self, result: RoundResult) -> SimulatedRound:
        return self._round(
            {
                update.client_id: (update.steps, *result.client_bytes.get(update.client_id, (0, 0)))
                for update in result.updates
            },
            missed=bool(self.late(result.dropped)),
        )

    def replay(self, metrics: RoundMetrics, default_steps: int) -> SimulatedRound:
        """A recorded round (its per-client steps and bytes) on this clock: the same run seen on other
        device profiles without training it again. Rounds recorded before metrics carried
        `client_steps` count `default_steps` (the run's local steps) for every client."""
        steps = metrics.client_steps or [default_steps] * len(metrics.clients)
        measured = {
            client: (client_steps, down, up)
            for client, client_steps, (down, up) in zip(
                metrics.clients, steps, metrics.client_bytes, strict=True
            )
        }
        return self._round(measured, missed=bool(self.late(metrics.dropped)))

    def _round(self, work: dict[int, tuple[int, int, int]], missed: bool) -> SimulatedRound:
        """`work`: each client's (local steps, bytes down, bytes up)."""
        client_s = {client: self.client_seconds(client, *figures) for client, figures in work.items()}
        slowest = max(client_s, key=client_s.get) if client_s else None
        seconds = max(client_s.values(), default=0.0)
        if missed:  # the server waited for the deadline before giving up on the late clients
            seconds = max(seconds, self.fleet.request.budget_s)
        client_j = {
            client: energy
            for client, busy_s in client_s.items()
            if (energy := simulated_energy_j(self.fleet.profile_for(client).power_w, busy_s)) is not None
        }
        return SimulatedRound(seconds, client_s, slowest, client_j)
