"""FedBERT's rounds: a transport wrapper that trains the server's body beside the federation of the
client parts (edgefed/split)."""

from __future__ import annotations

from edgefed.split.body import SplitSide
from edgefed.transport.base import Roster, Transport
from edgefed.types import RoundResult, State, client_name


class SplitRounds(Transport):
    """A transport whose rounds also train the body: the inner transport moves the client parts, the
    Split servicer serves the body meanwhile; the round's split traffic joins its result."""

    def __init__(self, inner: Transport, split: SplitSide) -> None:
        self.inner = inner
        self.split = split

    def wait_for_clients(self) -> list[int]:
        return self.inner.wait_for_clients()

    def fit_round(self, round_number: int, clients: list[int], global_state: State) -> RoundResult:
        names = {slot: client for client, slot in self.inner.roster().slots.items()}
        ids = {slot: names.get(slot, client_name(slot)) for slot in clients}
        self.split.trainer.begin_round(round_number, list(ids.values()))
        self.split.servicer.round = round_number
        self.split.servicer.take_traffic()  # what arrived between rounds (refused strays) is not this round's
        result = self.inner.fit_round(round_number, clients, global_state)
        traffic = self.split.servicer.take_traffic().values()
        result.split_bytes = (sum(up for up, _ in traffic), sum(down for _, down in traffic))
        self.split.trainer.end_round({ids[u.client_id]: u.num_examples for u in result.updates})
        self.split.sync_global()
        return result

    def finish(self) -> None:
        self.inner.finish()

    def close(self) -> None:
        self.inner.close()

    def roster(self) -> Roster:
        return self.inner.roster()
