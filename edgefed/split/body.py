"""FedBERT's body on the server: the transformer body and the strategy that trains it across clients.

- `sequential`: one body; the round's clients take turns (in-process they always do; over gRPC the
  server tells the next client to train only when the one before it has pushed or been dropped).
- `parallel`: every client trains its own copy of the round's starting body, and the copies of the
  clients whose updates arrived are averaged, weighted by their examples, as the client parts are.

Design choices the FedBERT paper (DOI 10.1145/3510033) leaves open: the body's optimizer is AdamW, fresh
at every round (as every client's own is), so a round is a function of the round's starting state alone;
the client part is averaged every round; the body clips its own gradient at `max-grad-norm` (a joint
norm with the client's part would cost one more exchange per step). A round that is run again (too few
updates) restarts from the body it started with. A client dropped in the middle of its sequential turn
leaves the steps it took in the body; in parallel mode its copy is discarded with its update."""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from edgefed.methods.fedbert.bert import BertBody
from edgefed.split.servicer import BodySlot, SplitBodyServicer
from edgefed.types import State
from edgefed.wire.framing import WireError


class BodyTrainer:
    """The server's body (its own copy, trained over the Split stream) and the round's body slots."""

    def __init__(
        self,
        body: nn.Module,
        strategy: str,
        lr: float,
        max_grad_norm: float | None,
        device: torch.device,
        seed: int | None = None,
    ) -> None:
        """`seed`: of the body's dropout, drawn per (round, client, step) (edgefed/split/)."""
        self.body = body.to(device).train()  # dropout as in the whole model's training (and in copies)
        self.seed = seed
        self.strategy = strategy
        self.lr = lr
        self.max_grad_norm = max_grad_norm or None
        self.round: int | None = None
        self._start: State = {}  # the body the open round started from
        self._slots: dict[str, BodySlot] = {}
        self._clients: set[str] = set()
        self._lock = threading.Lock()  # stream threads look up their slots at once

    def begin_round(self, round_number: int, clients: list[str]) -> None:
        if round_number == self.round:  # the round runs again: from the body it started with
            self.body.load_state_dict(self._start)
        else:
            self._start = {name: tensor.clone() for name, tensor in self.body.state_dict().items()}
        self.round = round_number
        with self._lock:
            self._clients, self._slots = set(clients), {}

    def slot(self, client_id: str) -> BodySlot:
        """The body `client_id` trains in the open round (refused for a client not sampled in it)."""
        with self._lock:
            if client_id not in self._clients:
                raise WireError(f"'{client_id}' does not train in round {self.round}")
            if client_id not in self._slots:
                if self.strategy == "sequential":
                    shared = next(iter(self._slots.values()), None) or self._new_slot(self.body)
                    self._slots[client_id] = shared
                else:  # parallel: a copy of the round's starting body, which no stream trains
                    self._slots[client_id] = self._new_slot(copy.deepcopy(self.body))
            return self._slots[client_id]

    def _new_slot(self, body: nn.Module) -> BodySlot:
        optimizer = torch.optim.AdamW(body.parameters(), lr=self.lr, weight_decay=0.0)
        return BodySlot(body, optimizer, self.max_grad_norm, self.seed)

    @torch.no_grad()
    def end_round(self, weights: dict[str, int]) -> None:
        """Parallel: the body becomes the weighted mean of the copies of the clients in `weights`."""
        with self._lock:
            slots, self._slots, self._clients = self._slots, {}, set()
        if self.strategy != "parallel":
            return
        trained = {client: slots[client] for client in weights if client in slots}
        if not trained:
            return
        total = sum(weights[client] for client in trained)
        copies = [(slot.body.state_dict(), weights[client] / total) for client, slot in trained.items()]
        averaged = {}
        for name, tensor in self.body.state_dict().items():
            if not tensor.is_floating_point():
                averaged[name] = tensor
                continue
            parts = [state[name] * share for state, share in copies]
            averaged[name] = torch.stack(parts).sum(dim=0) if len(parts) > 1 else parts[0]
        self.body.load_state_dict(averaged)

    def state_dict(self) -> State:
        return {name: tensor.detach().clone() for name, tensor in self.body.state_dict().items()}

    def load_state_dict(self, state: State) -> None:
        self.body.load_state_dict(state)


class SplitSide:
    """What a FedBERT server runs besides the federation: the body's trainer and its Split servicer."""

    def __init__(
        self, global_model: nn.Module, strategy: str, codec: str, lr: float, max_grad_norm: float | None,
        run_id: str, device: torch.device, log, seed: int,
    ) -> None:  # fmt: skip
        self.global_model = global_model
        body = BertBody(copy.deepcopy(global_model.bert)).requires_grad_(True)
        self.trainer = BodyTrainer(body, strategy, lr, max_grad_norm, device, seed)
        self.servicer = SplitBodyServicer(self.trainer.slot, run_id, codec, log=log)

    @torch.no_grad()
    def sync_global(self) -> None:
        """Copy the trained body into the global model, which evaluates and saves the whole model."""
        self.global_model.bert.encoder.load_state_dict(self.trainer.body.encoder.state_dict())
