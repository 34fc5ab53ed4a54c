"""The round book of a served run: the open round (who is sampled, what each has pushed, who was
dropped and why) and the bytes each client moved, counted once per client and round. Its checks raise
`Refusal`; call its methods under the servicer's condition where they say so."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefed.transport.base import ScopedStates, max_update_bytes
from edgefed.transport.clients import Code, Refusal
from edgefed.types import ClientUpdate, RoundResult, State


@dataclass
class OpenRound:
    number: int
    sampled: set[int]
    states: ScopedStates  # the global state as each client's scope sees it
    max_bytes: int
    deadline: float  # time.monotonic()
    turns: bool = False  # clients train one after another, in slot order (FedBERT's sequential body)
    updates: dict[int, ClientUpdate] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)  # slot -> why
    client_bytes: dict[int, list[int]] = field(default_factory=dict)  # slot -> [down, up]

    def waiting_for(self, slot: int) -> bool:
        return slot in self.sampled and slot not in self.updates and slot not in self.dropped

    def may_train(self, slot: int) -> bool:
        """Waiting for `slot`, and (taking turns) no client before it is still waiting."""
        if not self.waiting_for(slot):
            return False
        return not self.turns or all(not self.waiting_for(other) for other in self.sampled if other < slot)


class RoundBook:
    def __init__(self, turns: bool, condition: threading.Condition, log: Callable[[str], None]) -> None:
        """`turns`: the sampled clients train one after another (FedBERT's sequential strategy)."""
        self.turns, self.condition, self.log = turns, condition, log
        self.current: OpenRound | None = None
        self.bytes_up = self.bytes_down = 0
        # Setup bytes a client fetched between rounds: its share of the next round's transfer.
        self.setup_down: dict[int, int] = {}

    def open(self, number: int, sampled: list[int], global_state: State, deadline_s: float) -> None:
        with self.condition:
            self.current = OpenRound(
                number,
                set(sampled),
                ScopedStates(global_state),
                max_update_bytes(global_state),
                time.monotonic() + deadline_s,
                self.turns,
            )
            for slot, down in self.setup_down.items():
                self.current.client_bytes[slot] = [down, 0]
            self.setup_down = {}
            self.condition.notify_all()

    def close(self) -> RoundResult:
        with self.condition:
            current, self.current = self.current, None
            result = RoundResult(
                [current.updates[slot] for slot in sorted(current.updates)],
                sorted(current.dropped),
                self.bytes_up,
                self.bytes_down,
                {slot: (down, up) for slot, (down, up) in current.client_bytes.items()},
            )
            self.bytes_up = self.bytes_down = 0
        return result

    def drop_missing(self, alive: set[int], silence: str) -> bool:
        """Drop sampled clients that are not `alive` (silent for `silence`, in words) or missed the
        deadline; True when nobody is left to wait for (call under the condition)."""
        now, current = time.monotonic(), self.current
        for slot in sorted(current.sampled):
            if not current.waiting_for(slot):
                continue
            if now > current.deadline:
                current.dropped[slot] = "missed the round's deadline"
            elif slot not in alive:
                current.dropped[slot] = f"no heartbeat for {silence}"
            if slot in current.dropped:
                self.log(f"edgefed: round {current.number}: dropped client {slot} ({current.dropped[slot]})")
        return not any(current.waiting_for(slot) for slot in current.sampled)

    def round_for(self, slot: int, number: int) -> OpenRound:
        """Round `number`, open and waiting for this client's update (call under the condition)."""
        current = self.current
        if current is None or current.number != number:
            open_now = "no round is open" if current is None else f"round {current.number} is open"
            raise Refusal(Code.FAILED_PRECONDITION, f"round {number} is not open ({open_now})")
        return self.expecting(slot)

    def expecting(self, slot: int) -> OpenRound:
        """The open round, when it waits for this client's update (call under the condition)."""
        current = self.current
        if current is None:
            raise Refusal(Code.FAILED_PRECONDITION, "no round is open")
        number = current.number
        if slot in current.updates:
            raise Refusal(Code.ALREADY_EXISTS, f"client {slot} already pushed round {number}")
        if slot in current.dropped:
            raise Refusal(
                Code.FAILED_PRECONDITION,
                f"client {slot} was dropped from round {number}: "
                f"{current.dropped[slot]}; wait for the next round",
            )
        if slot not in current.sampled:
            raise Refusal(Code.FAILED_PRECONDITION, f"client {slot} is not sampled in round {number}")
        return current

    def accept(self, opened: OpenRound, slot: int, update: ClientUpdate, received: int, number: int) -> None:
        """Keep a checked update of round `opened`, if the round still waits for it (call under the
        condition); its `received` bytes count for its client only now."""
        if self.current is not opened or not opened.waiting_for(slot):
            raise Refusal(Code.FAILED_PRECONDITION, f"round {number} closed before the update")
        opened.updates[slot] = update
        self.credit(slot, opened.number, 0, received)

    def credit(self, slot: int, round_number: int, down: int, up: int) -> None:
        """Count bytes for the client in `slot` (call under the condition)."""
        self.bytes_down += down
        self.bytes_up += up
        current = self.current
        setup = round_number == 0  # FetchSetup: counted with the round it is fetched for
        if current is not None and (current.number == round_number or setup):
            counts = current.client_bytes.setdefault(slot, [0, 0])
            counts[0] += down
            counts[1] += up
        elif setup:
            self.setup_down[slot] = self.setup_down.get(slot, 0) + down
