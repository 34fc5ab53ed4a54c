"""In-process transport: the clients live in this process and take turns, through the real wire format.

Each round the global state is serialised and chunked exactly as the gRPC server streams it, each
client decodes it, trains, and its encoded delta is chunked, reassembled and checked as the gRPC
server would; so the bytes counted here are the bytes `--transport grpc` sends. The clients may
share one worker model: every fit starts by loading the global state into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgefed.client import FederatedClient, worker_for
from edgefed.codecs import Codec, make_codec
from edgefed.components import data_settings
from edgefed.devices.planner import Plan
from edgefed.methods.base import SetupState
from edgefed.runtimes import RUNTIMES
from edgefed.scope import Scope
from edgefed.setup import RunSetup
from edgefed.split import InProcessSplitStub, RemoteBody
from edgefed.transport.base import (
    LOSSLESS,
    RoundResult,
    RunContext,
    ScopedStates,
    Transport,
    max_update_bytes,
    receive_update,
    state_payload,
    update_bound,
)
from edgefed.types import State, client_name
from edgefed.wire.framing import Expected, reassemble, wire_size
from edgefed.wire.reader import parse_state
from edgefed.wire.sending import chunk_stream


@dataclass(frozen=True)
class InProcess:
    """A simulation's clients in this process (`edgefed run`, transport inproc)."""

    def open(self, setup: RunSetup, run: RunContext) -> InProcessTransport:
        """The clients take turns on one worker built only from the pre-trained files and the server's
        setup state, as a remote client builds it; each with its own shard and plan, trained by its
        runtime (the run's client-runtime list, in turn), whose trainer is made once. With FedBERT's
        split, each client reaches the server's body through its own stream to the Split servicer."""
        config = setup.config
        worker = worker_for(setup, setup.device)
        trainers = {
            name: RUNTIMES.create(name).trainer(worker.runtime_build(setup.tokenizer, run.run_dir / name))
            for name in dict.fromkeys(config.client_runtime)
        }
        settings = data_settings(config)
        clients = []
        for index, shard in enumerate(setup.shards):
            plan = setup.fleet.plan(index)
            seq_len = plan.seq_len if plan else config.max_seq_len
            examples = setup.task.encode_client(shard, setup.tokenizer, seq_len, settings)
            remote_body = None
            if run.split is not None:
                servicer = run.split.servicer
                stub = InProcessSplitStub(servicer)
                remote_body = RemoteBody(
                    stub, servicer.run_id, setup.method.settings.split_codec, client_name(index)
                )
            scope = setup.fleet.scope(plan) if plan else None
            trainer = trainers[config.client_runtime[index % len(config.client_runtime)]]
            clients.append(worker.client(index, examples, plan, scope, remote_body, run.on_step, trainer))
        return InProcessTransport(
            clients,
            setup.setup,
            make_codec(config.codec),
            run.run_id,
            config.chunk_bytes,
            config.max_update_norm,
            setup.device,
            [setup.fleet.scope(setup.fleet.plan(index)) for index in range(config.clients)],
        )


class InProcessTransport(Transport):
    def __init__(
        self,
        clients: list[FederatedClient],
        setup: SetupState,
        codec: Codec,
        run_id: str,
        chunk_bytes: int,
        max_update_norm: float | None,
        device: torch.device,
        scopes: list[Scope] | None = None,
    ) -> None:
        """`scopes`: what each client runs on and sends (the server's view of its plan); None: all."""
        self.clients = clients
        self.scopes = scopes
        self.setup_payload = state_payload(setup)
        self.codec = codec
        self.run_id = run_id
        self.chunk_bytes = chunk_bytes
        self.max_update_norm = max_update_norm
        self.device = device
        self._set_up: set[int] = set()

    def plans(self) -> dict[int, Plan]:
        return {index: client.plan for index, client in enumerate(self.clients) if client.plan is not None}

    def wait_for_clients(self) -> list[int]:
        return list(range(len(self.clients)))

    def fit_round(self, round_number: int, clients: list[int], global_state: State) -> RoundResult:
        result = RoundResult([])
        states = ScopedStates(global_state)
        for index in clients:
            name = client_name(index)
            scope = self.scopes[index] if self.scopes else states.full_scope()
            down = up = 0
            if index not in self._set_up:  # the one-off setup state, at a client's first round
                down += sum(map(wire_size, self._stream(self.setup_payload, 0, name)))
                self._set_up.add(index)
            chunks = list(self._stream(states.payload(scope), round_number, name))
            down += sum(map(wire_size, chunks))
            expected = Expected(self.run_id, round_number, states.down_shapes(scope), name)
            received = parse_state(reassemble(chunks, expected)[0], LOSSLESS, expected)
            update = self.clients[index].fit(
                round_number, {key: value.to(self.device) for key, value in received.items()}
            )
            chunks = list(update.chunks(self.run_id, round_number, name, self.chunk_bytes))
            up += sum(map(wire_size, chunks))
            shapes = states.up_shapes(scope)
            expected = Expected(
                self.run_id,
                round_number,
                shapes,
                name,
                max_bytes=max_update_bytes(global_state),
                max_norm=update_bound(self.max_update_norm, shapes),
            )
            result.updates.append(receive_update(chunks, expected, self.codec, index, self.device))
            result.bytes_down += down
            result.bytes_up += up
            result.client_bytes[index] = (down, up)
        return result

    def _stream(self, payload: bytes, round_number: int, name: str):
        return chunk_stream(payload, self.run_id, round_number, name, self.chunk_bytes)
