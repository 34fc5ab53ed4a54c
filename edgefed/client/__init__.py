"""A client: the one worker builder, local training, and a client's part of each round."""

from edgefed.client.federated import EncodedUpdate, FederatedClient
from edgefed.client.training import LocalTrainer, local_steps
from edgefed.client.worker import Worker, build_worker

__all__ = ["EncodedUpdate", "FederatedClient", "LocalTrainer", "Worker", "build_worker", "local_steps"]
