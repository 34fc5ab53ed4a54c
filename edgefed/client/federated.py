"""A client's part of a round, whatever carries it: train from the global state, encode the delta."""

from __future__ import annotations

from collections.abc import Callable

from edgefed.client.training import LocalTrainer
from edgefed.codecs import Codec, ErrorFeedback
from edgefed.data import EncodedExamples
from edgefed.data.rounds import client_round_seed
from edgefed.devices.planner import Plan
from edgefed.scope import Scope
from edgefed.split import RemoteBody
from edgefed.tasks.pseudo import PseudoLabels
from edgefed.types import State
from edgefed.wire.sending import EncodedUpdate, serialize_state


class FederatedClient:
    """One client: its data, its step budget, its seed stream and its codec's error-feedback residual."""

    def __init__(
        self,
        index: int,
        trainer: LocalTrainer,
        examples: EncodedExamples,
        steps: int,
        seed: int,
        codec: Codec,
        on_step: Callable[[int, int, float], None] = lambda round_number, client, loss: None,
        plan: Plan | None = None,
        scope: Scope | None = None,
        remote_body: RemoteBody | None = None,
        pseudo: PseudoLabels | None = None,
        holdout: EncodedExamples | None = None,
    ) -> None:
        """`plan` and `scope`: what this client's device trains (edgefed/devices/planner.py); None: all
        of what the run trains.
        `remote_body`: split learning (FedBERT): the client's stream to the server's body.
        `pseudo`, `holdout`: few-shot runs: the unlabelled pool it pseudo-labels each round, and the
        held-out slice its trained model is scored on (FewFedWeight)."""
        self.index = index
        self.trainer = trainer
        self.examples = examples
        self.steps = steps
        self.seed = seed
        self.feedback = ErrorFeedback(codec)
        self.on_step = on_step
        self.plan = plan
        self.scope = scope
        self.remote_body = remote_body
        self.pseudo = pseudo
        self.holdout = holdout

    def fit(self, round_number: int, global_state: State) -> EncodedUpdate:
        if self.remote_body is not None:  # the (maybe shared) worker calls this client's stream
            self.trainer.model.body = self.remote_body
            self.remote_body.start_round(round_number)
        try:
            update = self.trainer.fit(
                self.index,
                global_state,
                self.examples,
                self.steps,
                seed=client_round_seed(self.seed, round_number, self.index),
                on_step=lambda loss: self.on_step(round_number, self.index, loss),
                scope=self.scope,
                exit_layer=self.plan.exit_layer if self.plan else None,
                batch_size=self.plan.batch_size if self.plan else None,
                pseudo=self.pseudo,
                holdout=self.holdout,
            )
        finally:
            if self.remote_body is not None:
                self.remote_body.close()  # the server frees this client's stream until next round
        return EncodedUpdate(
            serialize_state(self.feedback.compress(update.delta, round_number)),
            update.num_examples,
            update.train_loss,
            update.steps,
            update.train_s,
            update.score,
        )
