"""FedBERT: federated split-learning pre-training (the method; its server-side body in edgefed/split)."""

from edgefed.methods.fedbert.method import FedBERT

__all__ = ["FedBERT"]
