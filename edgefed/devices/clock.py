"""The simulated device clock: how long a round would take if each client were its device profile.

Always labelled simulated: nothing here is measured on the devices. Per round, for each client k
that returned an update (the model of the time is edgefed/devices/costmodel.py's, in one place):

    compute_k  = train_s_k (measured on this machine) · step_s(plan_k, profile_k) / step_s(plan_k, host)
    transfer_k = profile_k.transfer_s(bytes down to k, bytes up from k)      the link's rates and latency
    round      = max_k (compute_k + transfer_k) + aggregate_s (measured on this machine: the server)

`host` is this machine's own profile, measured by `edgefed profile` (edgefed/devices/calibrate.py) when
the run starts, so the ratio scales the kind of work the plan does (GEMMs, memory traffic, launches)
from this machine's rates to the device's. The round's critical path is its slowest client, so a
straggler shows in simulated time-to-accuracy even when this machine trained it quickly.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefed.devices.costmodel import ModelShape, step_seconds
from edgefed.devices.fleet import FleetPlans
from edgefed.devices.profiles import DeviceProfile
from edgefed.types import RoundMetrics, RoundResult

LABEL = "simulated device clock"


@dataclass
class SimulatedRound:
    seconds: float  # the round's critical path
    client_s: dict[int, float]  # each client's simulated compute plus transfer
    slowest: int | None


class SimulatedClock:
    def __init__(self, fleet: FleetPlans, host: DeviceProfile, shape: ModelShape) -> None:
        self.fleet = fleet
        self.host = host
        self.shape = shape

    def client_seconds(self, slot: int, train_s: float, bytes_down: int, bytes_up: int) -> float:
        plan = self.fleet.plan(slot)
        profile = self.fleet.profile_for(slot)
        if plan is None or profile is None:  # a client without a profile runs at this machine's pace
            return train_s
        work = plan.workload
        ratio = step_seconds(self.shape, work, profile) / step_seconds(self.shape, work, self.host)
        return train_s * ratio + profile.transfer_s(bytes_down, bytes_up)

    def round(self, result: RoundResult, aggregate_s: float) -> SimulatedRound:
        return self._round(
            {
                update.client_id: (update.train_s, *result.client_bytes.get(update.client_id, (0, 0)))
                for update in result.updates
            },
            aggregate_s,
        )

    def replay(self, metrics: RoundMetrics) -> SimulatedRound:
        """A recorded round (its per-client training times and bytes) on this clock: the same run seen
        on other device profiles without training it again."""
        measured = {
            client: (train_s, down, up)
            for client, train_s, (down, up) in zip(
                metrics.clients, metrics.client_train_s, metrics.client_bytes, strict=True
            )
        }
        return self._round(measured, metrics.aggregate_s)

    def _round(self, measured: dict[int, tuple[float, int, int]], aggregate_s: float) -> SimulatedRound:
        """`measured`: each client's (training seconds on this machine, bytes down, bytes up)."""
        client_s = {client: self.client_seconds(client, *figures) for client, figures in measured.items()}
        slowest = max(client_s, key=client_s.get) if client_s else None
        return SimulatedRound(max(client_s.values(), default=0.0) + aggregate_s, client_s, slowest)
