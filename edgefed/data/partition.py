"""Splitting a training set across clients: IID or Dirichlet label skew, deterministic from a seed."""

from __future__ import annotations

import math

import numpy as np

from edgefed.errors import EdgefedError

# Dirichlet draws can leave a client (almost) empty; redraw until each has this many examples.
MIN_EXAMPLES_PER_CLIENT = 8
MAX_DRAWS = 200


def parse_partition(spec: str) -> tuple[str, float | None]:
    """`iid` -> ("iid", None); `dirichlet:0.5` -> ("dirichlet", 0.5)."""
    name, _, arg = spec.partition(":")
    if name == "iid" and not arg:
        return "iid", None
    if name == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if 0 < alpha < math.inf:
            return "dirichlet", alpha
        raise EdgefedError(f"partition '{spec}': dirichlet needs a positive alpha, e.g. dirichlet:0.5")
    raise EdgefedError(f"unknown partition '{spec}'; choose iid or dirichlet:<alpha>")


def partition(labels: list[int], num_clients: int, spec: str, seed: int) -> list[list[int]]:
    """Return one sorted list of example indices per client; every index appears exactly once."""
    kind, alpha = parse_partition(spec)
    if len(labels) < num_clients * MIN_EXAMPLES_PER_CLIENT:
        raise EdgefedError(
            f"{len(labels)} training examples are too few for {num_clients} clients "
            f"(each needs at least {MIN_EXAMPLES_PER_CLIENT})"
        )
    rng = np.random.default_rng(seed)
    if kind == "iid":
        shards = np.array_split(rng.permutation(len(labels)), num_clients)
        return [sorted(shard.tolist()) for shard in shards]
    return _dirichlet(np.asarray(labels), num_clients, alpha, rng, spec)


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng, spec: str) -> list[list[int]]:
    for _ in range(MAX_DRAWS):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shards[client].extend(part.tolist())
        if min(len(shard) for shard in shards) >= MIN_EXAMPLES_PER_CLIENT:
            return [sorted(shard) for shard in shards]
    raise EdgefedError(
        f"partition '{spec}' left a client with fewer than {MIN_EXAMPLES_PER_CLIENT} examples in "
        f"{MAX_DRAWS} draws; use fewer clients or a larger alpha"
    )
