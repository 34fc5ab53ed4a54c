"""The `Transport` interface: how a server's round reaches its clients, and what comes back.

Every transport moves states through the same wire format (edgefed/wire): the in-process one
serialises and checks exactly what the gRPC one sends, so both count the same bytes and refuse the
same malformed updates.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from edgefed.codecs import Codec, EncodedDelta, encode_state, make_codec
from edgefed.devices.planner import Plan
from edgefed.scope import Scope
from edgefed.types import ClientUpdate, EncodedTensor, RoundResult, State
from edgefed.wire.framing import Expected, WireError, reassemble
from edgefed.wire.reader import PayloadReader
from edgefed.wire.sending import serialize_state
from edgefed.wire.v1 import federation_pb2 as pb

if TYPE_CHECKING:
    from edgefed.setup import RunSetup
    from edgefed.split import SplitSide

# The global state and the setup go down losslessly; only client deltas use the run's codec.
LOSSLESS = make_codec("none")


@dataclass
class Roster:
    """The clients that joined a run: their slots, the training examples each declared at Join and,
    on a server without a token file, their session tokens' sha256; checkpointed, so a client that
    comes back to a restarted server keeps all three."""

    slots: dict[str, int] = field(default_factory=dict)  # client id -> slot
    examples: dict[str, int] = field(default_factory=dict)  # client id -> declared examples
    sessions: dict[str, str] = field(default_factory=dict)  # client id -> sha256 of its session token


@dataclass(frozen=True)
class RunContext:
    """What a run hands the transport it opens, beside its setup: its id and directory, the clients of
    a resumed run, the hook each local step reports to, the log, and FedBERT's split side (or None)."""

    run_id: str
    run_dir: Path
    roster: Roster
    on_step: Callable[[int, int, float], None]  # (round, client, loss) after each local step
    log: Callable[[str], None]
    split: SplitSide | None = None


class TransportMaker(Protocol):
    """How a run reaches its clients: in this process, client processes on loopback, devices over gRPC,
    Flower's nodes. `edgefed.federation.runner.federate` opens one and runs its rounds over it."""

    def open(self, setup: RunSetup, run: RunContext) -> Transport: ...


class Transport(ABC):
    @abstractmethod
    def wait_for_clients(self) -> list[int]:
        """The clients a round may sample from (blocking until enough are connected)."""

    @abstractmethod
    def fit_round(self, round_number: int, clients: list[int], global_state: State) -> RoundResult:
        """Send the global state to the sampled clients, let them train, and collect their updates."""

    def finish(self) -> None:  # noqa: B027 - a hook: only transports with remote clients need it
        """Tell the clients the run is over."""

    def close(self) -> None:  # noqa: B027 - a hook: only transports holding resources need it
        """Release what the transport holds (servers, processes), also after an error."""

    def plans(self) -> dict[int, Plan]:
        """Slot -> the plan of every client that joined with one (a device profile's)."""
        return {}

    def roster(self) -> Roster:
        """Every client that joined; checkpointed so that restarts keep them."""
        return Roster()


def state_payload(state: State) -> bytes:
    """A state serialised losslessly (the global model each round, the one-off setup)."""
    return serialize_state(encode_state(LOSSLESS, state))


# A client's update is refused beyond a per-value RMS of this much when the run sets no
# --max-update-norm: far above a fine-tuning step (Adam moves a value by about lr per step: 5 steps at
# 3e-3 is 0.015), far below values that overflow the model's arithmetic (one client's finite 1e30
# update made the evaluation loss NaN).
DEFAULT_UPDATE_RMS = 10.0


def update_bound(configured: float | None, shapes: dict[str, tuple[tuple[int, ...], str]]) -> float:
    """The L2 bound on an update of tensors so shaped: `--max-update-norm`, else
    DEFAULT_UPDATE_RMS × √(values it sends). Always a bound: there is no unbounded default."""
    if configured is not None:
        return configured
    return DEFAULT_UPDATE_RMS * math.sqrt(max(1, sum(math.prod(shape) for shape, _ in shapes.values())))


def state_shapes(state: State) -> dict[str, tuple[tuple[int, ...], str]]:
    return {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()}


class ScopedStates:
    """A round's global state as each client's scope sees it: what goes down, what must come up."""

    def __init__(self, global_state: State) -> None:
        self.global_state = global_state
        self._payloads: dict[tuple[str, ...], bytes] = {}

    def payload(self, scope: Scope) -> bytes:
        """The serialised part of the global state the client runs on (one serialisation per scope)."""
        if scope.received not in self._payloads:
            received = {name: self.global_state[name] for name in scope.received}
            self._payloads[scope.received] = state_payload(received)
        return self._payloads[scope.received]

    def full_scope(self) -> Scope:
        """The scope of a client without a plan: all of the state, both ways."""
        return Scope.everything({name: tuple(t.shape) for name, t in self.global_state.items()})

    def down_shapes(self, scope: Scope) -> dict[str, tuple[tuple[int, ...], str]]:
        return state_shapes({name: self.global_state[name] for name in scope.received})

    def up_shapes(self, scope: Scope) -> dict[str, tuple[tuple[int, ...], str]]:
        dtypes = state_shapes(self.global_state)
        return {name: (tuple(shape), dtypes[name][1]) for name, shape in scope.sent.items()}


def max_update_bytes(global_state: State) -> int:
    """Room for any codec's encoding of a delta (top-k at fraction 1 doubles it) plus framing."""
    return 2 * sum(t.numel() * t.element_size() for t in global_state.values()) + (1 << 20)


def receive_update(
    chunks: Iterable[pb.Chunk],
    expected: Expected,
    codec: Codec,
    client_index: int,
    device: torch.device,
    declared_examples: int | None = None,
) -> ClientUpdate:
    """Reassemble and check one client's pushed delta, kept encoded for the aggregator (edgefed.codecs
    .EncodedDelta); raises WireError, applying nothing. `declared_examples`: the count the client
    declared at Join, which the update must report."""
    reader = PayloadReader(codec, expected)  # checks each tensor while the next chunks arrive
    payload, first = reassemble(chunks, expected, reader.feed)
    return checked_update(reader.finish(payload), first, codec, client_index, device, declared_examples)


def checked_update(
    tensors: tuple[list[EncodedTensor], State],
    first: pb.Chunk,
    codec: Codec,
    client_index: int,
    device: torch.device,
    declared_examples: int | None = None,
) -> ClientUpdate:
    """An update from its checked tensors (PayloadReader.finish) and what it reports on its first chunk
    (n_k, loss, steps, time, held-out score, measured energy), checked too; raises WireError."""
    encoded, decoded = tensors
    if first.num_examples <= 0 or first.steps <= 0:
        raise WireError("an update must report its examples and local steps (first chunk)")
    if declared_examples is not None and first.num_examples != declared_examples:
        raise WireError(
            f"the update reports {first.num_examples:,} training examples; its client declared "
            f"{declared_examples:,} at Join"
        )
    if not math.isfinite(first.train_loss) or not math.isfinite(first.train_s):
        raise WireError("an update's training loss and time must be finite")
    score = first.score if first.HasField("score") else None
    if score is not None and not 0.0 <= score <= 1.0:
        raise WireError(f"an update's held-out score is an accuracy in [0, 1], got {score}")
    energy_j = first.energy_j if first.HasField("energy_j") else None
    if energy_j is not None and not 0.0 <= energy_j < math.inf:
        raise WireError(f"an update's energy must be finite joules, not below 0, got {energy_j}")
    return ClientUpdate(
        client_index,
        EncodedDelta(encoded, codec, device, decoded),
        first.num_examples,
        first.train_loss,
        first.steps,
        first.train_s,
        score,
        energy_j,
    )
