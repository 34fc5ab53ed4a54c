"""FewFedWeight's pseudo labels (Dong et al., arXiv 2212.08354): the broadcast global model labels a
client's unlabelled pool on the device, and an energy score weighs each pseudo label.

The paper names the steps and leaves the formulas open; the choices made here:

    energy      E(x) = −T·logsumexp(f(x)/T) over the global model's logits f (Liu et al., "Energy-based
                Out-of-distribution Detection", NeurIPS 2020): low energy = a confident, in-distribution
                input, so its pseudo label is more likely right.
    weight      w(x) = |P|·softmax_P(−z(x)), z the energy standardised over the client's pool P (mean 0,
                std 1): the weights average 1 over the pool, so λ alone sets the pseudo part's scale, and
                standardising makes them independent of the logits' scale.
    label       ŷ = argmax f(x), made with the global model as received, before any local step (the
                pseudo set is fixed for the round).
    loss        L = mean CE(labelled batch) + λ · mean(w·CE(pseudo batch)), one batch of each per step.
    start       each round's local training starts from the broadcast global model (a client keeps no
                model of its own between rounds), with a fresh optimiser, as every edgefed client does.

The held-out slice the aggregation scores (edgefed/aggregators/adaptive.py) comes out of the client's
K shots per class (edgefed/data/fewshot.py), so every setting trains on the same labelled examples.

Client inputs never leave the device: the labelling runs in the client's own round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from edgefed.data import EncodedExamples, ordered_batches
from edgefed.errors import EdgefedError

# How a client uses its unlabelled pool (`--pseudo-labels`).
PSEUDO_LABELS = {
    "none": "train on the few labels only",
    "uniform": "also on the global model's pseudo labels of the unlabelled pool, each weighted 1",
    "energy": "also on the global model's pseudo labels, each weighted by its energy score (FewFedWeight)",
}


def check_pseudo_labels(name: str) -> None:
    if name not in PSEUDO_LABELS:
        raise EdgefedError(f"unknown pseudo-labels '{name}'; choose one of: {', '.join(PSEUDO_LABELS)}")


LABEL_BATCH_SIZE = 64


@dataclass
class PseudoLabels:
    """A client's unlabelled pool and how its pseudo labels count."""

    pool: EncodedExamples
    weighting: str  # "uniform" or "energy"
    temperature: float  # T of the energy
    weight: float  # λ

    @torch.no_grad()
    def label(self, model: nn.Module, device: torch.device) -> EncodedExamples:
        """The pool with the model's labels and their weights (`example_weights` in each batch)."""
        model.eval()
        by_length = sorted(range(len(self.pool)), key=lambda i: len(self.pool.input_ids[i]))
        logits = torch.empty(0)
        for positions in ordered_batches(len(self.pool), LABEL_BATCH_SIZE):
            indices = [by_length[position] for position in positions]
            batch = {key: value.to(device) for key, value in self.pool.batch(indices).items()}
            batch.pop("labels")
            logits = torch.cat([logits, model(**batch).logits.float().cpu()])
        logits = logits[torch.argsort(torch.tensor(by_length))]  # back to the pool's order
        if self.weighting == "energy":
            weights = energy_weights(logits, self.temperature)
        else:
            weights = torch.ones(len(logits))
        return replace(self.pool, labels=logits.argmax(dim=-1).tolist(), weights=weights.tolist())


def energy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def energy_weights(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """|P|·softmax(−standardised energy): mean 1, lower energy counts more."""
    values = energy(logits, temperature)
    if len(values) < 2:
        return torch.ones(len(values))
    standardised = (values - values.mean()) / values.std().clamp(min=1e-6)
    return len(values) * torch.softmax(-standardised, dim=0)
