"""A client's round in numbers: how many local steps it takes, and the seed of its randomness. Plain
arithmetic, shared by every runtime (torch and the torch-free ONNX Runtime device)."""

from __future__ import annotations

import math


def local_steps(num_examples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    """A round's local steps: fixed, or enough batches for `epochs` passes over the client's data."""
    if steps is not None:
        return steps
    assert epochs is not None
    return max(1, math.ceil(epochs * num_examples / batch_size))


def client_round_seed(seed: int, round_number: int, client_id: int) -> int:
    """Distinct, reproducible randomness (batch order, dropout) per run, round and client."""
    return (seed * 1_000_003 + round_number * 10_007 + client_id) % (2**63)
