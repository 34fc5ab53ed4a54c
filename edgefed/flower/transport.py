"""`FlowerTransport`: edgefed's round over Flower's Grid, so a ServerApp runs the round loop every
edgefed transport runs (edgefed/federation/loop.py) — sampling, every aggregator, evaluation,
checkpoints — while Flower's engines carry the messages to simulated or deployed SuperNodes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from edgefed.codecs import make_codec
from edgefed.config import config_text
from edgefed.devices.planner import Plan, plan_text
from edgefed.errors import EdgefedError
from edgefed.flower.records import checked_reply, config_value, record_bytes, state_record
from edgefed.setup import RunSetup
from edgefed.transport.base import (
    Roster,
    RunContext,
    ScopedStates,
    Transport,
    checked_update,
    max_update_bytes,
    update_bound,
)
from edgefed.types import RoundResult, State
from edgefed.wire.framing import Expected, WireError
from edgefed.wire.text import printable

JOIN_ACTION = "join"  # the ClientApp's `query` handler for it
JOIN, TRAIN = f"query.{JOIN_ACTION}", "train"


@dataclass(frozen=True)
class OnFlower:
    """The run's rounds carried over Flower's `grid` to its SuperNodes (simulated or deployed)."""

    grid: Grid

    def open(self, setup: RunSetup, run: RunContext) -> FlowerTransport:
        return FlowerTransport(self.grid, setup, run.run_id, run.log)


class FlowerTransport(Transport):
    """The clients are Flower nodes. At first contact each says which slot it is (its partition id)
    and declares its training examples, as a Join does over edgefed's own gRPC."""

    def __init__(self, grid: Grid, side: RunSetup, run_id: str, log: Callable[[str], None]) -> None:
        self.grid, self.side, self.run_id, self.log = grid, side, run_id, log
        self.codec = make_codec(side.config.codec)
        self.nodes: dict[int, int] = {}  # slot -> node id
        self.examples: dict[int, int] = {}  # slot -> declared training examples
        self.set_up: set[int] = set()  # slots that have the setup state

    def wait_for_clients(self) -> list[int]:
        wanted, deadline = self.side.config.clients, time.monotonic() + self.side.config.round_deadline_s
        while len(self.nodes) < wanted:
            new = [node for node in self.grid.get_node_ids() if node not in self.nodes.values()]
            if new:
                self._join(new)
            elif time.monotonic() > deadline:
                raise EdgefedError(f"{len(self.nodes)} of {wanted} Flower nodes joined in time")
            else:
                time.sleep(0.2)
        return sorted(self.nodes)

    def fit_round(self, round_number: int, clients: list[int], global_state: State) -> RoundResult:
        states, config = ScopedStates(global_state), self.side.config
        messages, down = [], {}
        for slot in clients:
            plan = self.side.fleet.plan(slot)
            scope = self.side.fleet.scope(plan) if plan else states.full_scope()
            content = RecordDict(
                {
                    "run": self._run_record(),
                    "global": state_record({name: global_state[name] for name in scope.received}),
                    "config": ConfigRecord(
                        {"round": round_number, "plan_toml": plan_text(plan) if plan else ""}
                    ),
                }
            )
            if slot not in self.set_up:  # the one-off setup state (FeDeRA's), with a client's first round
                content["setup"] = state_record(self.side.setup)
            down[slot] = sum(record_bytes(record) for record in content.array_records.values())
            messages.append(Message(content, dst_node_id=self.nodes[slot], message_type=TRAIN))
        replies = self.grid.send_and_receive(messages, timeout=config.round_deadline_s)
        by_node = {reply.metadata.src_node_id: reply for reply in replies}
        result = RoundResult([])
        for slot in clients:
            reply = by_node.get(self.nodes[slot])
            result.bytes_down += down[slot]
            if reply is None or reply.has_error():
                why = (
                    "no reply by the round's deadline" if reply is None else client_error(reply.error.reason)
                )
                result.dropped.append(slot)
                self.log(f"edgefed: round {round_number}: dropped client {slot} ({why})")
                continue
            self.set_up.add(slot)
            plan = self.side.fleet.plan(slot)
            scope = self.side.fleet.scope(plan) if plan else states.full_scope()
            shapes = states.up_shapes(scope)
            expected = Expected(
                self.run_id,
                round_number,
                shapes,
                max_bytes=max_update_bytes(global_state),
                max_norm=update_bound(config.max_update_norm, shapes),
            )
            try:
                tensors, report = checked_reply(reply.content, self.codec, expected)
                update = checked_update(
                    tensors, report, self.codec, slot, self.side.device, self.examples[slot]
                )
            except WireError as error:
                result.dropped.append(slot)
                self.log(f"edgefed: round {round_number}: refused client {slot}'s update: {error}")
                continue
            up = record_bytes(reply.content["update"])
            result.updates.append(update)
            result.bytes_up += up
            result.client_bytes[slot] = (down[slot], up)
        return result

    def roster(self) -> Roster:
        names = {slot: f"flower-node-{node}" for slot, node in self.nodes.items()}
        return Roster(
            {name: slot for slot, name in names.items()}, {names[s]: n for s, n in self.examples.items()}
        )

    def plans(self) -> dict[int, Plan]:
        return {slot: plan for slot in self.nodes if (plan := self.side.fleet.plan(slot)) is not None}

    def _run_record(self) -> ConfigRecord:
        """What a node needs to build its client: in every message, since a simulation may hand a
        node's messages to any of its actors."""
        side = self.side
        return ConfigRecord(
            {
                "run_id": self.run_id,
                "config_toml": config_text(side.config),
                "num_labels": side.num_labels,
                "head_modules": list(side.spec.head_modules),
                "model_fingerprint": side.fingerprint,
            }
        )

    def _join(self, nodes: list[int]) -> None:
        """Tell new nodes the run; each answers with its slot and its declared training examples."""
        side, run = self.side, self._run_record()
        messages = [Message(RecordDict({"run": run}), dst_node_id=node, message_type=JOIN) for node in nodes]
        for reply in self.grid.send_and_receive(messages, timeout=side.config.round_deadline_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise EdgefedError(f"Flower node {node} could not join: {client_error(reply.error.reason)}")
            joined = reply.content["joined"]
            slot = config_value(joined, "slot", int, f"Flower node {node}")
            examples = config_value(joined, "num_examples", int, f"Flower node {node}")
            if not 0 <= slot < side.config.clients or slot in self.nodes:
                raise EdgefedError(f"Flower node {node} claims slot {slot}, which is out of range or taken")
            if not 0 < examples <= side.config.max_client_examples:
                raise EdgefedError(
                    f"Flower node {node} declares {examples:,} training examples; a client may declare 1 to "
                    f"{side.config.max_client_examples:,} (max-client-examples)"
                )
            self.nodes[slot], self.examples[slot] = node, examples
            self.log(f"edgefed: Flower node {node} joined as client {slot} ({examples:,} training examples)")


def client_error(reason: str) -> str:
    """What a node's ClientApp raised, out of Flower's error reason, which wraps it in class names
    (`<class '…'>:<'message'>`) and, simulated, in Ray's traceback (`… Message: message`)."""
    for marker in ("Message: ", ":<'"):
        if marker in reason:
            reason = reason.rsplit(marker, 1)[1]
            break
    lines = [line for line in reason.strip().splitlines() if line.strip()] or ["(no reason given)"]
    return printable(lines[0].removesuffix("'>"), 300)
