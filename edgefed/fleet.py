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
from edgefed.config import RunConfig
from edgefed.costmodel import ModelShape
from edgefed.errors import EdgefedError
from edgefed.methods.base import AdapterSpec, LowRankPair, Method, SetupState
from edgefed.planner import Plan, Request, plan_for
from edgefed.profiles import DeviceProfile, load_profile
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
    pairs = method.low_rank_pairs(model)
    shape = ModelShape.of(
        model,
        base_params,
        [key for pair in pairs for key in (pair.a, pair.b)],
        spec.rank,
        method.adapters_see_all_tokens,
    )
    return model, setup, shape


def plan_request(config: RunConfig) -> Request:
    if config.local_steps is None and config.budget_s is not None:
        raise EdgefedError("budget-s bounds a round's local steps: set local-steps, not local-epochs")
    return Request(
        rank=config.rank,
        batch_size=config.batch_size,
        seq_len=config.max_seq_len,
        local_steps=config.local_steps or 1,
        bytes_per_sent_value=codec_bytes_per_value(config.codec),
        budget_s=config.budget_s,
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
