"""One contract, every registered aggregator; then FedAvg's error against product-space exactness."""

import pytest
import torch

from edgefed.aggregators import AGGREGATORS, ClientUpdate
from edgefed.aggregators.adaptive import score_weights
from edgefed.codecs import EncodedDelta, encode_state, make_codec
from edgefed.kernels import weighted_sum
from edgefed.methods import LowRankPair
from tests.tolerance import (
    UNIT,
    assert_within,
    balance_bound,
    float64_svd_error,
    gamma,
    truncation_error,
)

CPU = torch.device("cpu")

D_OUT, D_IN, RANK = 12, 7, 3  # non-square, so a transposed ΔW cannot pass
PAIRS = [LowRankPair(a="layer.lora_A", b="layer.lora_B", scale=2.0)]


def random_state(seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.lora_A": torch.randn(RANK, D_IN, generator=generator),
        "layer.lora_B": torch.randn(D_OUT, RANK, generator=generator),
        "head.weight": torch.randn(2, D_OUT, generator=generator),
        "head.bias": torch.randn(2, generator=generator),
    }


def update(client, delta, examples=10):
    """A client's update; its held-out score (what `adaptive` weighs by) grows with its examples."""
    return ClientUpdate(client, delta, examples, train_loss=0.5, steps=1, train_s=0.0, score=examples / 100)


def client_weights_of(aggregator, updates):
    """The p_k an aggregator gives tensors outside factor pairs: by held-out score or by examples."""
    if aggregator.name == "adaptive":
        return score_weights(updates)
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def delta_between(local, global_state):
    return {key: local[key] - global_state[key] for key in global_state}


def effective(state):
    """What a state computes: the factor pair as its product s·B·A, every other tensor as is."""
    result = {
        key: value.double() for key, value in state.items() if key not in ("layer.lora_A", "layer.lora_B")
    }
    result["delta_w"] = 2.0 * state["layer.lora_B"].double() @ state["layer.lora_A"].double()
    return result


def magnitude(*states):
    """What the states' effective tensors are made of, elementwise: Σ|x| and, for the pair,
    s·(Σ|B|)·(Σ|A|), which covers every cross term a product of sums or differences of them has."""
    plain = [key for key in states[0] if key not in ("layer.lora_A", "layer.lora_B")]
    result = {key: sum(state[key].double().abs() for state in states) for key in plain}
    b = sum(state["layer.lora_B"].double().abs() for state in states)
    result["delta_w"] = 2.0 * b @ sum(state["layer.lora_A"].double().abs() for state in states)
    return result


def assert_same_function(got, expected, inputs):
    """`got` and `expected` compute one function, up to the float32 rounding of an aggregation of
    `inputs` (the states the clients and the server hold): every effective element passes through at
    most K + 4 roundings (a client's delta, its weight, K − 1 sums, the addition to the global state,
    a float64 factor's cast) of values no larger than the sum of the inputs' magnitudes, and two
    products of rounded factors (2u·s·|B|·|A|); the product aggregator's float64 QR and SVD add
    (d_out + d_in + K·r)·u₆₄ of the same magnitudes."""
    relative = (
        gamma(len(inputs) + 4)
        + 2 * UNIT[torch.float32]
        + gamma(D_OUT + D_IN + len(inputs) * RANK, torch.float64)
    )
    scale = magnitude(*inputs, got, expected)
    got, expected = effective(got), effective(expected)
    assert got.keys() == expected.keys()
    for key in got:
        assert_within(got[key], expected[key], relative * scale[key], key)


# Robust aggregators ignore the weights clients report, by design (tests at the end of this file).
ROBUST = ("median", "trimmed-mean")


@pytest.fixture(params=AGGREGATORS.names())
def aggregator(request):
    return AGGREGATORS.create(request.param)


@pytest.fixture(params=[name for name in AGGREGATORS.names() if name not in ROBUST])
def weighing_aggregator(request):
    return AGGREGATORS.create(request.param)


def test_zero_deltas_keep_the_global_state(aggregator):
    global_state = random_state(0)
    zero = {key: torch.zeros_like(value) for key, value in global_state.items()}
    result = aggregator.aggregate(global_state, [update(0, zero), update(1, zero)], PAIRS)
    assert_same_function(result, global_state, [global_state])


def test_identical_clients_give_their_model(aggregator):
    global_state, local = random_state(0), random_state(1)
    delta = delta_between(local, global_state)
    result = aggregator.aggregate(global_state, [update(0, delta, 5), update(1, delta, 50)], PAIRS)
    assert_same_function(result, local, [global_state, local, local])


def test_shapes_and_dtypes_are_kept(aggregator):
    global_state = random_state(0)
    updates = [update(k, delta_between(random_state(k + 1), global_state)) for k in range(3)]
    result = aggregator.aggregate(global_state, updates, PAIRS)
    for key, value in global_state.items():
        assert result[key].shape == value.shape and result[key].dtype == value.dtype, key


def test_tensors_outside_factor_pairs_are_weighted_by_client_weights(weighing_aggregator):
    aggregator = weighing_aggregator
    global_state, one, two = random_state(0), random_state(1), random_state(2)
    updates = [
        update(0, delta_between(one, global_state), 30),
        update(1, delta_between(two, global_state), 10),
    ]
    first, second = client_weights_of(aggregator, updates)
    result = aggregator.aggregate(global_state, updates, PAIRS)
    inputs = [global_state, one, two]
    for key in ("head.weight", "head.bias"):
        # Against p₁·x₁ + p₂·x₂ in float64: the K + 4 roundings of `assert_same_function` over |inputs|.
        expected = first * one[key].double() + second * two[key].double()
        bound = gamma(len(inputs) + 4) * sum(state[key].double().abs() for state in inputs)
        assert_within(result[key], expected, bound, key)


def test_client_order_does_not_matter(aggregator):
    global_state = random_state(0)
    updates = [update(k, delta_between(random_state(k + 1), global_state), 5 + k) for k in range(3)]
    forward = aggregator.aggregate(global_state, updates, PAIRS)
    backward = aggregator.aggregate(global_state, updates[::-1], PAIRS)
    assert_same_function(forward, backward, [global_state] + [random_state(k + 1) for k in range(3)])


def test_no_updates_is_an_error(aggregator):
    with pytest.raises(ValueError, match="zero client updates"):
        aggregator.aggregate(random_state(0), [], PAIRS)


def disjoint_clients():
    """Two clients whose products use different rank directions: the mean product has rank 2 ≤ r."""
    generator = torch.Generator().manual_seed(5)
    global_state = {"layer.lora_A": torch.zeros(RANK, D_IN), "layer.lora_B": torch.zeros(D_OUT, RANK)}
    locals_ = []
    for direction in (0, 1):
        state = {key: value.clone() for key, value in global_state.items()}
        state["layer.lora_A"][direction] = torch.randn(D_IN, generator=generator)
        state["layer.lora_B"][:, direction] = torch.randn(D_OUT, generator=generator)
        locals_.append(state)
    return global_state, locals_


def mean_product(locals_, weights):
    return sum(
        w * 2.0 * s["layer.lora_B"].double() @ s["layer.lora_A"].double()
        for w, s in zip(weights, locals_, strict=True)
    )


def test_product_is_exact_where_fedavg_is_not():
    global_state, locals_ = disjoint_clients()
    updates = [
        update(k, delta_between(local, global_state), n)
        for k, (local, n) in enumerate(zip(locals_, (3, 1), strict=True))
    ]
    target = mean_product(locals_, (0.75, 0.25))
    errors, results = {}, {}
    for name in ("fedavg", "product"):
        results[name] = AGGREGATORS.create(name).aggregate(global_state, updates, PAIRS)
        got = 2.0 * results[name]["layer.lora_B"].double() @ results[name]["layer.lora_A"].double()
        errors[name] = ((got - target).norm() / target.norm()).item()
    # Exact up to rounding the float64 factors to float32 (2u + u² of s·|B|·|A|) and float64's QR and
    # SVD ((d_out + d_in + K·r)·u₆₄ of the clients' products).
    exact = magnitude(results["product"])["delta_w"] * (2 * UNIT[torch.float32] + UNIT[torch.float32] ** 2)
    exact = exact + gamma(D_OUT + D_IN + 2 * RANK, torch.float64) * magnitude(*locals_)["delta_w"]
    assert errors["product"] <= (exact.norm() / target.norm()).item()
    # FedAvg gives Σ p_k² B_k A_k here: off by 1 - p_k in each direction.
    assert errors["fedavg"] > 0.2


def test_product_is_the_best_rank_r_approximation_of_the_mean_product():
    global_state = random_state(0)
    locals_ = [random_state(k + 1) for k in range(4)]
    weights = (0.1, 0.2, 0.3, 0.4)
    updates = [
        update(k, delta_between(local, global_state), int(w * 100))
        for k, (local, w) in enumerate(zip(locals_, weights, strict=True))
    ]
    target = mean_product(locals_, weights)
    u, s, vh = torch.linalg.svd(target)
    best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
    product = AGGREGATORS.create("product").aggregate(global_state, updates, PAIRS)
    fedavg = AGGREGATORS.create("fedavg").aggregate(global_state, updates, PAIRS)
    got = 2.0 * product["layer.lora_B"].double() @ product["layer.lora_A"].double()
    # The aggregator's QR-then-SVD and the test's SVD both find the rank-r truncation of nearly one
    # matrix: the aggregator's clients are the global state plus float32 deltas (u of each difference,
    # 2u of the products), and each route has its float64 backward error. The truncations may differ by
    # their turn under these perturbations (Wedin), plus the factors' rounding to float32.
    magnitudes = magnitude(global_state, *locals_)["delta_w"]
    backward = (
        float64_svd_error(target)
        + (2 * UNIT[torch.float32] + gamma(D_OUT + D_IN + 4 * RANK, torch.float64)) * magnitudes.norm().item()
    )
    rounding = (2 * UNIT[torch.float32] + UNIT[torch.float32] ** 2) * magnitude(product)["delta_w"]
    assert_within(got, best, rounding + truncation_error(s, RANK, backward))
    fedavg_w = 2.0 * fedavg["layer.lora_B"].double() @ fedavg["layer.lora_A"].double()
    assert (got - target).norm() <= (fedavg_w - target).norm()
    # Balanced factors, as FeDeRA starts them: AAᵀ = BᵀB.
    a, b = product["layer.lora_A"].double(), product["layer.lora_B"].double()
    assert_within(a @ a.T, b.T @ b, balance_bound(a, b, svd_rows=D_OUT + D_IN))


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "int4", "topk:0.5"])
def test_an_encoded_update_aggregates_as_its_decoded_delta(aggregator, codec):
    """Updates reach the aggregator still encoded (as the server receives them); every aggregator gives
    exactly what it gives on the decoded deltas, whether or not its sum dequantises on the fly."""
    codec = make_codec(codec)
    global_state = random_state(0)
    encoded = [
        EncodedDelta(encode_state(codec, delta_between(random_state(seed), global_state)), codec, CPU)
        for seed in (1, 2, 3)
    ]
    as_received = [update(k, delta, 10 * (k + 1)) for k, delta in enumerate(encoded)]
    as_decoded = [
        update(k, {name: delta[name] for name in delta}, 10 * (k + 1)) for k, delta in enumerate(encoded)
    ]
    got = aggregator.aggregate(global_state, as_received, PAIRS)
    expected = aggregator.aggregate(global_state, as_decoded, PAIRS)
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def test_the_server_sums_quantised_updates_without_decoding_them(
    tmp_path, tiny_model_dir, small_data_dir, monkeypatch
):
    """A run with int8 deltas: the server's FedAvg hands every tensor to `weighted_sum` as int8 values
    and scales (the fused dequantise-and-sum path), never as decoded floats."""
    from edgefed.aggregators import base
    from edgefed.cli import main

    calls = []

    def recording_sum(deltas, weights, scales=None, **kwargs):
        calls.append((deltas.dtype if scales is not None else "float", len(weights)))
        return weighted_sum(deltas, weights, scales, **kwargs)

    monkeypatch.setattr(base, "weighted_sum", recording_sum)
    argv = ["run", "--model", str(tiny_model_dir), "--data", str(small_data_dir), "--clients", "2"]
    argv += ["--rounds", "2", "--local-steps", "1", "--batch-size", "8", "--max-seq-len", "16"]
    assert main([*argv, "--codec", "int8", "--out", str(tmp_path / "run")]) == 0
    assert calls and all(call == (torch.int8, 2) for call in calls)


def honest_and_hostile(seed: int = 7, honest: int = 4):
    """Honest clients whose deltas scatter around a common step, and one that sends a huge step the
    other way claiming 10¹⁵ examples."""
    generator = torch.Generator().manual_seed(seed)
    global_state = random_state(0)
    step = {key: torch.randn(value.shape, generator=generator) for key, value in global_state.items()}
    updates = [
        update(k, {key: s + 0.1 * torch.randn(s.shape, generator=generator) for key, s in step.items()})
        for k in range(honest)
    ]
    updates.append(update(honest, {key: -1000 * s for key, s in step.items()}, examples=10**15))
    return global_state, step, updates


@pytest.mark.parametrize("name", ROBUST)
def test_robust_aggregators_hold_against_one_hostile_client(name):
    global_state, step, updates = honest_and_hostile()
    robust = AGGREGATORS.create(name).aggregate(global_state, updates, PAIRS)
    fedavg = AGGREGATORS.create("fedavg").aggregate(global_state, updates, PAIRS)
    for key in global_state:
        moved = robust[key] - global_state[key]
        assert (moved - step[key]).norm() < 0.25 * step[key].norm(), key
        assert (fedavg[key] - global_state[key] - step[key]).norm() > 100 * step[key].norm(), key


@pytest.mark.parametrize("name", ROBUST)
def test_robust_aggregators_ignore_reported_example_counts(name):
    global_state, _, updates = honest_and_hostile()
    modest = [*updates[:-1], update(updates[-1].client_id, updates[-1].delta, examples=1)]
    aggregator = AGGREGATORS.create(name)
    claimed, honest = (aggregator.aggregate(global_state, u, PAIRS) for u in (updates, modest))
    for key in global_state:
        assert torch.equal(claimed[key], honest[key]), key


def test_median_and_trimmed_mean_per_coordinate_after_clipping_to_the_median_norm():
    global_state = {"w": torch.zeros(2)}
    values = [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [0.0, 40.0]]
    updates = [update(k, {"w": torch.tensor(v)}) for k, v in enumerate(values)]
    # Norms 1, 2, 3, 4, 40: the median is 3, so [4, 0] becomes [3, 0] and [0, 40] becomes [0, 3].
    median = AGGREGATORS.create("median").aggregate(global_state, updates, [])
    torch.testing.assert_close(median["w"], torch.tensor([2.0, 0.0]))
    trimmed = AGGREGATORS.create("trimmed-mean").aggregate(global_state, updates, [])  # one dropped each end
    torch.testing.assert_close(trimmed["w"], torch.tensor([2.0, 0.0]))
    four = AGGREGATORS.create("median").aggregate(
        global_state, updates[:4], []
    )  # even: mean of the middle two
    torch.testing.assert_close(four["w"], torch.tensor([2.0, 0.0]))
