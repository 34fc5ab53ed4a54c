"""The `hetero` aggregator on constructed updates, and the scopes that produce them."""

import pytest
import torch

from edgefed.aggregators import AGGREGATORS, ClientUpdate
from edgefed.errors import EdgefedError
from edgefed.methods import LowRankPair
from edgefed.scope import client_scope
from tests.tolerance import assert_within, gamma

A, B = "encoder.layer.1.query.lora_A.default.weight", "encoder.layer.1.query.lora_B.default.weight"
PAIRS = [LowRankPair(A, B, scale=1.0)]
SHAPES = {
    "embeddings.word.weight": (5, 3),
    "encoder.layer.0.query.lora_A.default.weight": (4, 6),
    A: (4, 6),
    B: (6, 4),
    "classifier.weight": (2, 6),
}


def global_state(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def update(client, delta, n):
    return ClientUpdate(client, delta, n, 0.5, 3, 0.1)


def test_full_updates_give_fedavg():
    state = global_state()
    generator = torch.Generator().manual_seed(1)
    updates = [
        update(k, {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}, n)
        for k, n in enumerate((10, 30, 60))
    ]
    hetero = AGGREGATORS.create("hetero").aggregate(state, updates, PAIRS)
    fedavg = AGGREGATORS.create("fedavg").aggregate(state, updates, PAIRS)
    for name in SHAPES:
        # Both form x + Σ p_k·δ_k in float32, maybe in other orders: each within γ_{K+2} of
        # |x| + Σ p_k·|δ_k| of the exact value (K = 3 clients), so within twice that of each other.
        magnitude = state[name].abs() + sum(u.num_examples / 100 * u.delta[name].abs() for u in updates)
        assert_within(hetero[name], fedavg[name], 2 * gamma(len(updates) + 2) * magnitude, name)


def test_each_element_is_averaged_over_the_clients_that_hold_it():
    state = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    full_rank = update(
        0, {A: torch.ones(4, 6), B: torch.ones(6, 4), "classifier.weight": torch.ones(2, 6)}, 10
    )
    rank_two = update(
        1, {A: 4 * torch.ones(2, 6), B: 4 * torch.ones(6, 2), "classifier.weight": torch.zeros(2, 6)}, 30
    )
    result = AGGREGATORS.create("hetero").aggregate(state, [full_rank, rank_two], PAIRS)
    # Components 0-1: both clients, weighted 10:30; components 2-3: only the full-rank client.
    torch.testing.assert_close(result[A][:2], torch.full((2, 6), (10 * 1 + 30 * 4) / 40))
    torch.testing.assert_close(result[A][2:], torch.ones(2, 6))
    torch.testing.assert_close(result[B][:, :2], torch.full((6, 2), (10 * 1 + 30 * 4) / 40))
    torch.testing.assert_close(result[B][:, 2:], torch.ones(6, 2))
    torch.testing.assert_close(result["classifier.weight"], torch.full((2, 6), 10 / 40))
    # Nobody trained these: they keep their values exactly.
    assert torch.equal(result["embeddings.word.weight"], state["embeddings.word.weight"])
    assert torch.equal(
        result["encoder.layer.0.query.lora_A.default.weight"],
        state["encoder.layer.0.query.lora_A.default.weight"],
    )


def test_a_block_that_is_not_leading_or_larger_is_refused():
    state = global_state()
    with pytest.raises(ValueError, match="leading block"):
        AGGREGATORS.create("hetero").aggregate(state, [update(0, {A: torch.ones(5, 6)}, 1)], PAIRS)
    with pytest.raises(ValueError, match="zero client updates"):
        AGGREGATORS.create("hetero").aggregate(state, [], PAIRS)


@pytest.mark.parametrize("name", ["fedavg", "product"])
def test_other_aggregators_point_to_hetero_for_partial_updates(name):
    state = global_state()
    partial = {key: torch.zeros(shape) for key, shape in SHAPES.items() if key != "classifier.weight"}
    with pytest.raises(EdgefedError, match="--aggregator hetero"):
        AGGREGATORS.create(name).aggregate(state, [update(0, partial, 1)], PAIRS)


def test_scope_of_a_plan():
    everything = client_scope(SHAPES, PAIRS, frozen_layers=0, exit_layer=2, rank=4)
    assert everything.sent == SHAPES and set(everything.received) == set(SHAPES)
    upper = client_scope(SHAPES, PAIRS, frozen_layers=1, exit_layer=2, rank=2)
    assert set(upper.received) == set(SHAPES)  # it still runs layer 0 with the global adapters
    assert upper.sent == {A: (2, 6), B: (6, 2), "classifier.weight": (2, 6)}
    shallow = client_scope(SHAPES, PAIRS, frozen_layers=0, exit_layer=1, rank=4)
    assert A not in shallow.received and B not in shallow.sent
    assert "encoder.layer.0.query.lora_A.default.weight" in shallow.sent
    assert "embeddings.word.weight" in shallow.sent  # embeddings train only with no frozen layer
