"""A client: the one worker builder, local training, and a client's part of each round."""

from edgefed.client.federated import EncodedUpdate, FederatedClient
from edgefed.client.training import LocalTrainer
from edgefed.client.worker import Worker, build_worker, client_worker, worker_for
from edgefed.data.rounds import local_steps

__all__ = [
    "EncodedUpdate",
    "FederatedClient",
    "LocalTrainer",
    "Worker",
    "build_worker",
    "client_worker",
    "local_steps",
    "worker_for",
]
