"""The roster of a served run: who may call (bearer tokens), who has joined into which slot, what each
declared (its training examples, its FedAvg weight), which plan and runtime it has, and when it was
last heard from. Its checks raise `Refusal`, which the servicer turns into a gRPC status."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from edgefed.devices.fleet import FleetPlans
from edgefed.devices.planner import Plan
from edgefed.errors import EdgefedError
from edgefed.transport.auth import SessionTokens, TokenBook, TokenOwners
from edgefed.transport.base import Roster
from edgefed.wire.text import printable

Code = grpc.StatusCode
MISSED_HEARTBEATS = 3  # a client unheard for this many heartbeat intervals counts as gone


@dataclass
class Refusal(Exception):
    """A call refused: the status its caller gets, and why."""

    code: grpc.StatusCode
    message: str


class ClientBook:
    """Slots, tokens and declarations of one run's clients. Call its methods under `condition` where
    they say so; the servicer shares the condition with the round book."""

    def __init__(
        self,
        num_clients: int,
        tokens: TokenBook | None,
        roster: Roster | None,
        fleet: FleetPlans | None,
        max_examples: int,
        heartbeat_s: float,
        condition: threading.Condition,
        log: Callable[[str], None],
    ) -> None:
        """`roster`: a resumed run's clients (their slots and declared example counts); `fleet`: plans
        each client's work from its profile (--profiles, or the one it announces)."""
        self.num_clients, self.tokens, self.fleet = num_clients, tokens, fleet
        self.max_examples, self.heartbeat_s = max_examples, heartbeat_s
        self.condition, self.log = condition, log
        roster = roster or Roster()
        # Without a token file each client gets a token at its first Join (edgefed/transport/auth.py).
        self.sessions = SessionTokens(roster.sessions) if tokens is None else None
        self.slots = dict(roster.slots)  # client id -> slot
        # slot -> the training examples its client declared at Join (its weight)
        self.examples = {self.slots[c]: n for c, n in roster.examples.items() if c in self.slots}
        self.plans: dict[int, Plan | None] = {}  # slot -> the plan sent at its Join
        self.runtime_of: dict[int, str] = {}  # slot -> the runtime its client joined with
        self.last_seen: dict[int, float] = {}
        self.told_done: set[int] = set()

    # -- who calls -------------------------------------------------------------------------------

    @property
    def book(self) -> TokenOwners:
        """The tokens calls are checked against: the token file's, or those issued at Join."""
        return self.tokens if self.tokens is not None else self.sessions

    def owner(self, metadata: Sequence[tuple[str, str]]) -> str | None:
        """The client whose bearer token the call carries (None: no token, or an unknown one)."""
        return self.book.caller(metadata)

    def slot_of(self, owner: str) -> int:
        """The slot of a token's owner (a token file's line, or the slot it joined; call under the
        condition)."""
        return self.tokens.slots[owner] if self.tokens is not None else self.slots[owner]

    def check_joining(self, client_id: str, metadata: Sequence[tuple[str, str]]) -> None:
        """A Join: with a token file, the client's own token; without, nothing for a client id nobody
        holds yet (its Join gives it its token), else that client's session token (a rejoin)."""
        if self.sessions is not None and not self.sessions.has(client_id):
            return
        if self.sessions is not None and self.owner(metadata) is None:
            raise Refusal(
                Code.UNAUTHENTICATED,
                f"'{printable(client_id)}' has joined this run already, and only its session token may "
                "rejoin it (a device that restarts keeps its identity with the server's --tokens)",
            )
        self.check_token(client_id, metadata)

    def check_token(self, client_id: str, metadata: Sequence[tuple[str, str]]) -> None:
        owner = self.book.caller(metadata)
        if owner is None:
            raise Refusal(Code.UNAUTHENTICATED, "missing or unknown bearer token")
        if owner != client_id:
            raise Refusal(
                Code.PERMISSION_DENIED,
                f"the token belongs to '{printable(owner)}', not '{printable(client_id)}'",
            )

    def slot(self, client_id: str, run_id: str, this_run: str, metadata: Sequence[tuple[str, str]]) -> int:
        """The slot of a joined client calling about run `run_id` (this run is `this_run`)."""
        self.check_token(client_id, metadata)
        if run_id != this_run:
            raise Refusal(Code.FAILED_PRECONDITION, f"wrong run id '{run_id}'; join again")
        slot = self.slots.get(client_id)
        if slot is None:
            raise Refusal(Code.FAILED_PRECONDITION, f"'{client_id}' has not joined this run")
        return slot

    # -- joining ---------------------------------------------------------------------------------

    def join(self, client_id: str, profile: str, runtime: str) -> tuple[int, Plan | None, bool, str]:
        """Give the client its slot (its own again when it rejoins) and its plan; returns (slot, plan,
        whether it had joined before, its new session token or "")."""
        with self.condition:
            slot = self.slots.get(client_id)
            if slot is None:
                slot = self.slots[client_id] = self._free_slot(client_id, profile)
            self.seen(slot)  # live from now: its heartbeats start before it builds its model
        plan = None
        if self.fleet is not None:
            try:
                self.fleet.check_announced(slot, profile)
                plan = self.fleet.plan(slot, profile)
            except EdgefedError as error:  # an unknown profile, another device's slot, or no plan fits
                with self.condition:
                    if self.slots.get(client_id) == slot and slot not in self.plans:
                        del self.slots[client_id]  # it never joined: its slot stays free
                raise Refusal(Code.INVALID_ARGUMENT, f"{printable(client_id)}: {error}") from None
        with self.condition:
            rejoined = slot in self.plans
            self.plans[slot] = plan
            self.runtime_of[slot] = runtime
            # Issued only with a slot: tokens are as many as the run's clients, however many ids try.
            fresh = self.sessions is not None and not self.sessions.has(client_id)
            session = self.sessions.issue(client_id) if fresh else ""
        return slot, plan, rejoined, session

    def _free_slot(self, client_id: str, profile: str) -> int:
        """A token's own slot, or the first free one (of the announced device's, in a fleet)."""
        if self.tokens is not None:
            return self.tokens.slots[client_id]
        taken = set(self.slots.values())
        free = [slot for slot in range(self.num_clients) if slot not in taken]
        if not free:
            raise Refusal(Code.RESOURCE_EXHAUSTED, f"the run has its {self.num_clients} clients already")
        if self.fleet is not None:
            try:
                return (self.fleet.matching(free, profile) or free)[0]  # a mismatch is refused in join
            except EdgefedError as error:  # an unknown profile
                raise Refusal(Code.INVALID_ARGUMENT, f"{client_id}: {error}") from None
        return free[0]

    def declare(self, slot: int, count: int) -> None:
        """Fix the client's example count, its aggregation weight, for the run."""
        if not 0 < count <= self.max_examples:
            raise Refusal(
                Code.INVALID_ARGUMENT,
                f"client {slot} declared {count:,} training examples; a client may declare 1 to "
                f"{self.max_examples:,} (max-client-examples)",
            )
        with self.condition:
            known = self.examples.setdefault(slot, count)
        if known != count:
            raise Refusal(
                Code.FAILED_PRECONDITION,
                f"client {slot} declared {known:,} training examples; the count is fixed for the run",
            )
        self.log(f"edgefed: client {slot} declared {count:,} training examples")

    # -- liveness ----------------------------------------------------------------------------------

    def seen(self, slot: int) -> None:
        """The client in `slot` was heard from (call under the condition). Only a client that was not
        connected wakes the server's waits (for clients, for a round): a thousand clients' heartbeats
        each waking an open round's checks held the lock their heartbeats need (benchmarks/load.py)."""
        now, before = time.monotonic(), self.last_seen.get(slot)
        self.last_seen[slot] = now
        if before is None or before < now - MISSED_HEARTBEATS * self.heartbeat_s:
            self.condition.notify_all()

    def connected(self) -> list[int]:
        """Slots heard from within the last MISSED_HEARTBEATS intervals (call under the condition)."""
        horizon = time.monotonic() - MISSED_HEARTBEATS * self.heartbeat_s
        return sorted(slot for slot, seen in self.last_seen.items() if seen >= horizon)

    def roster(self) -> Roster:
        """What a checkpoint keeps of the clients (call under the condition)."""
        names = {slot: client for client, slot in self.slots.items()}
        examples = {names[slot]: count for slot, count in self.examples.items() if slot in names}
        return Roster(dict(self.slots), examples, self.sessions.digests() if self.sessions else {})
