"""The fleet's plans: each client slot's device profile, its plan and its scope.

`--profiles a,b,c` assigns profile a to client 0, b to client 1, c to client 2, a to client 3, and
so on (`2×a + b` is `a,a,b`; `a@3` caps a's exit depth at 3 blocks). `--fleet-strategy` says whether
each client gets the planner's plan for its device or the run's own settings (FLEET_STRATEGIES).
Without `--profiles`, a gRPC client's plan comes from the profile it announces when it joins
(`edgefed client --profile NAME`); a client with neither trains what the run's configuration says.
Plans are pure functions of the configuration, the model and the profile, so a resumed server and a
rejoining client arrive at the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from edgefed.devices.costmodel import ModelShape, Workload
from edgefed.devices.planner import Plan, Request, plan_as_asked, plan_for
from edgefed.devices.profiles import DeviceProfile, device_entry, load_profile
from edgefed.errors import EdgefedError
from edgefed.methods.base import AdapterSpec, LowRankPair, Method, SetupState
from edgefed.scope import Scope, Shape, client_scope


def adapted_fleet(
    method: Method,
    base: nn.Module,
    spec: AdapterSpec,
    request: Request,
    profiles: tuple[str, ...] = (),
    strategy: str = "planned",
) -> tuple[nn.Module, SetupState, FleetPlans]:
    """The server's global model adapted from `base` (`Method.prepare_global`), its setup state, and
    the fleet's plans for it."""
    model, setup, shape = adapt_and_measure(method, base, spec)
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters() if param.requires_grad}
    fleet = FleetPlans(
        shape, request, method.early_exits, shapes, method.low_rank_pairs(model), profiles, strategy
    )
    return model, setup, fleet


def adapt_and_measure(
    method: Method, base: nn.Module, spec: AdapterSpec
) -> tuple[nn.Module, SetupState, ModelShape]:
    """The server's global model (`Method.prepare_global`), and its shape for the cost model."""
    base_params = list(base.parameters())
    model, setup = method.prepare_global(base, spec)
    return model, setup, measure_shape(method, model, base_params, spec)


def measure_shape(
    method: Method, model: nn.Module, base_params: list[nn.Parameter], spec: AdapterSpec
) -> ModelShape:
    """The cost model's view of `model`, adapted by `method` from a model with `base_params`."""
    pairs = method.low_rank_pairs(model)
    return ModelShape.of(
        model,
        base_params,
        [key for pair in pairs for key in (pair.a, pair.b)],
        spec.rank,
        method.adapters_see_all_tokens,
        method.backward_through_blocks,
    )


# How a fleet's clients are given work (`--fleet-strategy`): name -> what it does.
FLEET_STRATEGIES = {
    "planned": "each device its own plan within budget-s (frozen layers, exit, rank, batch, length)",
    "uniform": "every device the run's settings; a round waits for the slowest",
    "deadline": "every device the run's settings; a client whose round exceeds budget-s is dropped",
}


def check_fleet_settings(profiles: tuple[str, ...], strategy: str, budget_s: float | None) -> None:
    """Every profile a fleet names exists, its strategy is known, and a deadline has its budget."""
    for name in sorted({device_entry(entry)[0] for entry in profiles}):  # a fleet of 100,000 names few
        load_profile(name)
    if strategy not in FLEET_STRATEGIES:
        raise EdgefedError(
            f"unknown fleet-strategy '{strategy}'; choose one of: {', '.join(FLEET_STRATEGIES)}"
        )
    if strategy == "deadline" and budget_s is None:
        raise EdgefedError("fleet-strategy deadline drops the clients that miss budget-s: set budget-s")


@dataclass
class FleetPlans:
    shape: ModelShape
    request: Request
    early_exits: bool
    shapes: dict[str, Shape]  # the global communicated state's tensor shapes
    pairs: list[LowRankPair]
    profiles: tuple[str, ...] = ()  # fleet entries (edgefed/devices/profiles.py parse_fleet), in turn
    strategy: str = "planned"
    _plans: dict[str, Plan] = field(default_factory=dict)
    _profiles: dict[str, DeviceProfile] = field(default_factory=dict)

    def entry_for(self, slot: int, announced: str = "") -> str:
        return self.profiles[slot % len(self.profiles)] if self.profiles else announced

    def profile_for(self, slot: int, announced: str = "") -> DeviceProfile | None:
        name, _ = device_entry(self.entry_for(slot, announced))
        if not name:
            return None
        if name not in self._profiles:  # read each file once: the clock asks every client every round
            self._profiles[name] = load_profile(name)
        return self._profiles[name]

    def matching(self, slots: list[int], announced: str) -> list[int]:
        """The slots among `slots` whose device is the one a joining client announced (all of them when
        the fleet names no devices or the client announced none)."""
        if not self.profiles or not announced:
            return slots
        name = load_profile(announced).name
        return [slot for slot in slots if self.profile_for(slot).name == name]

    def check_announced(self, slot: int, announced: str) -> None:
        """A client that announces a device must be the device the fleet has in its slot."""
        if self.matching([slot], announced) != [slot]:
            raise EdgefedError(
                f"announced {load_profile(announced).name}, but the fleet's client {slot} is a "
                f"{self.profile_for(slot).name}"
            )

    def on_profile(self, name: str) -> FleetPlans:
        """The same fleet with every client on the profile `name`."""
        return self.replanned(self.request, (name,), self.strategy)

    def replanned(self, request: Request, profiles: tuple[str, ...], strategy: str) -> FleetPlans:
        """The same model's fleet under another request, devices or strategy (planned afresh)."""
        return FleetPlans(self.shape, request, self.early_exits, self.shapes, self.pairs, profiles, strategy)

    def reduced(self, plan: Plan) -> bool:
        """Whether the plan trains less than the run asks (layers, exit, rank, batch or length)."""
        asked = Workload(
            0, self.shape.layers, self.request.rank, self.request.batch_size, self.request.seq_len
        )
        return plan.workload != asked

    def plan(self, slot: int, announced: str = "") -> Plan | None:
        entry = self.entry_for(slot, announced)
        profile = self.profile_for(slot, announced)
        if profile is None:
            return None
        if entry not in self._plans:
            self._plans[entry] = self._plan(entry, profile)
        return self._plans[entry]

    def _plan(self, entry: str, profile: DeviceProfile) -> Plan:
        _, max_exit = device_entry(entry)
        if max_exit is not None and not self.early_exits:
            raise EdgefedError(f"{entry}: an exit depth needs an early-exit method (ee-adapter)")
        if max_exit is not None and max_exit > self.shape.layers:
            raise EdgefedError(f"{entry}: exit after block {max_exit}, but the model has {self.shape.layers}")
        if self.strategy == "planned":
            return plan_for(self.shape, profile, self.request, self.early_exits, max_exit)
        return plan_as_asked(self.shape, profile, self.request, max_exit or self.shape.layers)

    def misses_deadline(self, slot: int) -> bool:
        """Whether a `deadline` fleet drops this client: its predicted round exceeds the budget."""
        if self.strategy != "deadline":
            return False
        plan = self.plan(slot)
        return plan is not None and plan.round_s > self.request.budget_s

    def check(self, clients: int, combines_plans: bool) -> None:
        """Plan every client now, so that a fleet no plan or deadline suits fails before the run starts;
        clients that train different tensors need an aggregator that `combines_plans` (hetero)."""
        for slot in range(clients):
            self.plan(slot)
        if clients and all(self.misses_deadline(slot) for slot in range(clients)):
            fastest = min(self.plan(slot).round_s for slot in range(clients))
            raise EdgefedError(
                f"no device meets the budget of {self.request.budget_s:g} s: the fastest needs "
                f"{fastest:.2f} s a round with the run's settings"
            )
        if not combines_plans and self.heterogeneous(range(clients)):
            raise EdgefedError(
                "the clients' plans train different tensors (frozen layers, exits or ranks differ from the "
                "run's); combine them with --aggregator hetero"
            )

    def describe(self, clients: int) -> list[str]:
        """Each client's profile and plan, a line each."""
        lines = [f"edgefed: fleet strategy {self.strategy}: {FLEET_STRATEGIES[self.strategy]}"]
        for index in range(clients):
            plan = self.plan(index)
            late = "; misses the budget: dropped every round" if self.misses_deadline(index) else ""
            lines.append(
                f"edgefed: client {index}: {plan.profile}: layers {plan.frozen_layers}-{plan.exit_layer - 1} "
                f"train (exit {plan.exit_layer}), rank {plan.rank}, batch {plan.batch_size}, length "
                f"{plan.seq_len}; predicted {plan.step_s:.3f} s/step, {plan.round_s:.2f} s/round, "
                f"{plan.peak_gb:.2f} GB (SIMULATED){late}"
            )
        return lines

    def scope(self, plan: Plan | None) -> Scope:
        if plan is None:
            return Scope.everything(self.shapes)
        return scope_of_plan(plan, self.shapes, self.pairs)

    def heterogeneous(self, slots: range) -> bool:
        """Whether these clients train different tensors (then only `hetero` can aggregate them)."""
        return any(not self.scope(self.plan(slot)).is_full(self.shapes) for slot in slots)


def scope_of_plan(plan: Plan, shapes: dict[str, Shape], pairs: list[LowRankPair]) -> Scope:
    return client_scope(shapes, pairs, plan.frozen_layers, plan.exit_layer, plan.rank)
