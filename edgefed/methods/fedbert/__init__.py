"""FedBERT: federated split-learning pre-training (the method, and its cut of a BERT model)."""

from edgefed.methods.fedbert.method import SPLIT_STRATEGIES, FedBERT

__all__ = ["SPLIT_STRATEGIES", "FedBERT"]
