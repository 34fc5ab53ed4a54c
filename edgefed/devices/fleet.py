"""The fleet's plans: each client slot's device profile, its plan and its scope.

`--profiles a,b,c` assigns profile a to client 0, b to client 1, c to client 2, a to client 3, and
so on. Without it, a gRPC client's plan comes from the profile it announces when it joins
(`edgefed client --profile NAME`); a client with neither trains what the run's configuration says.
Plans are pure functions of the configuration, the model and the profile, so a resumed server and a
rejoining client arrive at the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from edgefed.codecs import encode_state, make_codec
from edgefed.devices.costmodel import ModelShape
from edgefed.devices.planner import Plan, Request, plan_for
from edgefed.devices.profiles import DeviceProfile, load_profile
from edgefed.methods.base import AdapterSpec, LowRankPair, Method, SetupState
from edgefed.scope import Scope, Shape, client_scope


def codec_bytes_per_value(codec: str) -> float:
    """What the codec spends per element of a delta (measured on a probe tensor, framing excluded)."""
    import torch

    probe = {"probe": torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))}
    encoded = encode_state(make_codec(codec), probe)
    tensor = encoded[0]
    return (len(tensor.data) + len(tensor.scales) + len(tensor.indices)) / probe["probe"].numel()


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
    )


@dataclass
class FleetPlans:
    shape: ModelShape
    request: Request
    early_exits: bool
    shapes: dict[str, Shape]  # the global communicated state's tensor shapes
    pairs: list[LowRankPair]
    profiles: tuple[str, ...] = ()
    _plans: dict[str, Plan] = field(default_factory=dict)
    _profiles: dict[str, DeviceProfile] = field(default_factory=dict)

    def profile_for(self, slot: int, announced: str = "") -> DeviceProfile | None:
        name = self.profiles[slot % len(self.profiles)] if self.profiles else announced
        if not name:
            return None
        if name not in self._profiles:  # read each file once: the clock asks every client every round
            self._profiles[name] = load_profile(name)
        return self._profiles[name]

    def on_profile(self, name: str) -> FleetPlans:
        """The same fleet with every client on the profile `name`."""
        return FleetPlans(self.shape, self.request, self.early_exits, self.shapes, self.pairs, (name,))

    def plan(self, slot: int, announced: str = "") -> Plan | None:
        profile = self.profile_for(slot, announced)
        if profile is None:
            return None
        if profile.name not in self._plans:
            self._plans[profile.name] = plan_for(self.shape, profile, self.request, self.early_exits)
        return self._plans[profile.name]

    def scope(self, plan: Plan | None) -> Scope:
        if plan is None:
            return Scope.everything(self.shapes)
        return scope_of_plan(plan, self.shapes, self.pairs)

    def heterogeneous(self, slots: range) -> bool:
        """Whether these clients train different tensors (then only `hetero` can aggregate them)."""
        return any(not self.scope(self.plan(slot)).is_full(self.shapes) for slot in slots)


def scope_of_plan(plan: Plan, shapes: dict[str, Shape], pairs: list[LowRankPair]) -> Scope:
    return client_scope(shapes, pairs, plan.frozen_layers, plan.exit_layer, plan.rank)
