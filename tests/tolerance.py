"""Tolerances derived from the computation a test checks, never fitted to one machine's arithmetic.

The rounding model is the standard one (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd
ed., 2002, §2.2 and §3.1): each floating-point operation returns the exact result times (1 + δ) with
|δ| ≤ u, the unit roundoff (half the dtype's epsilon), so an inner product of n terms is within

    |fl(xᵀy) − xᵀy| ≤ γ_n · |x|ᵀ|y|,    γ_n = n·u / (1 − n·u),

whatever the summation order, blocking, fused multiply-adds or thread count a BLAS picks. Bounds built
from it hold on every IEEE machine (Intel, AMD, ARM; one thread or many), and they are elementwise, so
a wrong element is caught however small the others are.

The helpers:
- `product_bound` and `gamma` for linear algebra a test can bound a priori, and Wedin's and Weyl's
  perturbation bounds for what an SVD may return (`truncation_error`, `vector_turn`);
- `assert_within` to compare against an elementwise bound;
- `assert_runs_agree` for two float32 training runs that may round differently (another process,
  another CPU for a golden value), with the probabilistic bound of Higham & Mary (2019) over the
  run's chain of roundings (`training_terms`);
- `assert_as_accurate` (a network's outputs) and `assert_as_accurate_in_norm` (a training run's states or
  losses) where a priori bounds through softmax, normalisation and an optimiser would be far too loose
  to catch a bug: the reference also runs in float64, and the float32 computation under test must be
  no less accurate than the float32 reference, within `ACCURACY_FACTOR`.
"""

from __future__ import annotations

import math

import torch

# Unit roundoff u = eps / 2 of each dtype.
UNIT = {
    dtype: torch.finfo(dtype).eps / 2
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}

# Two float32 evaluations of one function that differ only in the order of their operations (another
# kernel, batch shape, thread count or runtime) make rounding errors of one distribution; the largest
# of many such errors in one tensor varies between evaluations by well under 2× (the maximum of n
# errors concentrates as n grows). 4 leaves twice that margin; a bug moves results by orders of
# magnitude more than rounding does, so it still fails.
ACCURACY_FACTOR = 4.0


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """γ_n of `dtype`: the relative bound on n accumulated roundings (Higham, Lemma 3.1)."""
    nu = n * UNIT[dtype]
    assert nu < 1, f"γ_{n} is undefined for {dtype}"
    return nu / (1 - nu)


def probable_gamma(n: int, dtype: torch.dtype = torch.float32, confidence: float = 8.0) -> float:
    """γ̃_n(λ) = exp(λ·√n·u + n·u²/(1 − u)) − 1: the relative error of n accumulated roundings that holds
    with probability at least 1 − 2n·exp(−λ²(1 − u)²/2) when rounding errors are independent with mean
    zero (Higham & Mary, "A New Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci.
    Comput. 41(5), 2019, Thm 2.4). λ = 8 makes the failure probability 2n·e⁻³² ≈ n·2.5e-14. For the
    long chains of a training run, where the worst case n·u is orders of magnitude too pessimistic."""
    unit = UNIT[dtype]
    return math.expm1(confidence * math.sqrt(n) * unit + n * unit**2 / (1 - unit))


def training_terms(
    config, seq_len: int, batch_size: int, steps: int, eval_examples: int = 0, outputs: int = 2
) -> int:
    """Roundings along one value's chain through `steps` training steps of a BERT-like encoder (config:
    hidden_size, intermediate_size, num_hidden_layers) with a softmax over `outputs` classes (the
    vocabulary for a language model), and an evaluation over `eval_examples`.

    Per layer, forward: the q, k, v and output projections and two LayerNorms (hidden terms each), the
    attention over seq_len keys and the feed-forward's down projection (intermediate terms); backward,
    the same chain again plus each weight gradient's sum over the batch's tokens."""
    layer = 6 * config.hidden_size + seq_len + config.intermediate_size
    forward = config.num_hidden_layers * layer + config.hidden_size + outputs
    backward = forward + config.num_hidden_layers * batch_size * seq_len
    return steps * (forward + backward) + (forward + eval_examples if eval_examples else 0)


def product_bound(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elementwise bound on the rounding of `a @ b` computed in `dtype`: γ_k · |a|·|b|, k = inner size."""
    return gamma(a.shape[-1], dtype) * (a.double().abs() @ b.double().abs())


def assert_within(
    got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float, what: str = ""
) -> None:
    """|got − expected| ≤ bound, element by element (bound broadcasts), with the worst excess reported."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    gap = (got.double() - expected.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64)
    excess = gap - bound
    worst = int(excess.argmax())
    assert excess.flatten()[worst] <= 0, (
        f"{what}: |got − expected| = {gap.flatten()[worst].item():.3e} at flat index {worst} exceeds its "
        f"bound {bound.expand_as(gap).flatten()[worst].item():.3e} (largest gap {gap.max().item():.3e})"
    )


def rounding_floor(reference64: torch.Tensor, terms: int, dtype: torch.dtype = torch.float32) -> float:
    """The least rounding error a float evaluation of `reference64` can be held to: γ_terms of its largest
    magnitude (a reference that happens to round exactly must not make the bound zero)."""
    return gamma(terms, dtype) * reference64.abs().max().item()


def flat(values) -> torch.Tensor:
    """A state (name → tensor), a list of numbers or a tensor as one float64 vector, in a fixed order."""
    if isinstance(values, dict):
        return torch.cat([torch.as_tensor(values[name]).double().flatten() for name in sorted(values)])
    return torch.as_tensor(values, dtype=torch.float64).flatten()


def assert_runs_agree(a, b, terms: int, what: str = "") -> None:
    """Two float32 runs of one computation that may round differently (another process's thread
    count, another CPU for a golden value): ‖a − b‖₂ ≤ γ̃_terms·(‖a‖₂ + ‖b‖₂) (`probable_gamma`).

    AdamW steps a parameter whose gradient is at rounding level by ±lr, whichever way the rounding
    fell: such parameters (attention key biases, which softmax ignores) are left out by the callers;
    a loss barely depends on them, which is why they make no difference to losses."""
    a, b = flat(a), flat(b)
    assert a.shape == b.shape, f"{what}: {a.numel()} values != {b.numel()}"
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what}: non-finite values"
    bound = probable_gamma(terms) * (a.norm() + b.norm()).item()
    error = (a - b).norm().item()
    assert error <= bound, f"{what}: ‖a − b‖ = {error:.3e} > γ̃_{terms}·(‖a‖ + ‖b‖) = {bound:.3e}"


def assert_as_accurate_in_norm(got, reference32, reference64, what: str = "", terms: int = 1) -> None:
    """A training run (its states or its losses), judged as a whole: ‖got − reference64‖₂ is at most
    ACCURACY_FACTOR times ‖reference32 − reference64‖₂ (or `rounding_floor`'s γ_terms·‖reference64‖).

    Whole, not tensor by tensor: AdamW divides each gradient by its own running magnitude, so where a
    gradient is as small as its rounding error one run's step and another's can differ by up to 2·lr in
    either direction, in whichever elements that happens to hit; the norm over the whole run is the
    figure two float32 runs of one computation share."""
    got, reference32, reference64 = flat(got), flat(reference32), flat(reference64)
    assert got.shape == reference64.shape, f"{what}: {got.numel()} values != {reference64.numel()}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    reference_error = (reference32 - reference64).norm().item()
    floor = gamma(terms) * reference64.norm().item()
    error = (got - reference64).norm().item()
    bound = ACCURACY_FACTOR * max(reference_error, floor)
    assert error <= bound, (
        f"{what}: ‖got − float64‖ = {error:.3e} > {ACCURACY_FACTOR:g} × max(the float32 reference's "
        f"{reference_error:.3e}, the rounding floor {floor:.3e})"
    )


def assert_as_accurate(
    got: torch.Tensor,
    reference32: torch.Tensor,
    reference64: torch.Tensor,
    what: str = "",
    terms: int = 1,
) -> None:
    """`got`, a float32 computation of what the reference computes, is no further from the reference's
    float64 evaluation than ACCURACY_FACTOR times the reference's own float32 evaluation is, nor than
    `rounding_floor(reference64, terms)` (`terms`: the roundings along one output's chain)."""
    reference_error = (reference32.double() - reference64).abs().max().item()
    bound = ACCURACY_FACTOR * max(reference_error, rounding_floor(reference64, terms))
    assert_within(got, reference64, bound, what)


# Singular value decompositions: what a computed SVD may differ by (perturbation theory).


def svd_error(weight: torch.Tensor, computed: tuple[torch.Tensor, ...]) -> float:
    """‖U·S·Vᵀ − W‖₂ in float64: the backward error E of a computed SVD, which is the exact SVD of W + E."""
    u, s, vh = (t.double() for t in computed)
    return torch.linalg.matrix_norm((u * s) @ vh - weight.double(), ord=2).item()


def float64_svd_error(weight: torch.Tensor) -> float:
    """A priori backward error of LAPACK's float64 SVD: p(n)·u·‖W‖₂ with p(n) = n (LAPACK Users' Guide
    §4.9 calls p a modestly growing function; n is generous)."""
    return max(weight.shape) * UNIT[torch.float64] * torch.linalg.matrix_norm(weight.double(), ord=2).item()


def truncation_error(sigma: torch.Tensor, rank: int, error: float) -> float:
    """Bound on ‖(W+E)_r − W_r‖₂, the change of the best rank-r approximation under a perturbation E
    (‖E‖₂ = error): ‖E‖ for the perturbation itself plus σ₁·sin Θ for the turn of the top-r singular
    subspace, sin Θ ≤ ‖E‖ / (σ_r − σ_{r+1} − ‖E‖) (Wedin's theorem, BIT 12, 1972)."""
    gap = (sigma[rank - 1] - sigma[rank]).item() - error
    assert gap > 0, "the rank-r subspace is not determined at this precision"
    return error * (1 + sigma[0].item() / gap)


def vector_turn(sigma: torch.Tensor, index: int, error: float) -> float:
    """Bound on ‖v − ṽ‖₂ for singular vector `index` under a perturbation of norm `error`: √2·sin θ with
    sin θ ≤ ‖E‖ / (its distance to the nearest other singular value − ‖E‖) (Wedin)."""
    others = torch.cat([sigma[:index], sigma[index + 1 :]])
    gap = (others - sigma[index]).abs().min().item() - error
    assert gap > 0, f"singular vector {index} is not determined at this precision"
    return 2**0.5 * error / gap


def balance_bound(a: torch.Tensor, b: torch.Tensor, svd_rows: int) -> torch.Tensor:
    """Elementwise bound on |A·Aᵀ − Bᵀ·B| for factors balanced from one float64 SVD (both diag(σ/s))
    and rounded to float32: (2u + u²)·(|A|·|Aᵀ| + |Bᵀ|·|B|) for the rounding, and the float64 singular
    vectors' loss of orthogonality, |VᵀV − I| ≤ n·u₆₄ (n = svd_rows), scaled by √(σᵢσⱼ)/s for each side."""
    a64, b64 = a.double(), b.double()
    u32 = UNIT[torch.float32]
    rounding = (2 * u32 + u32**2) * (a64.abs() @ a64.abs().T + b64.abs().T @ b64.abs())
    diagonal = torch.diagonal(a64 @ a64.T).abs().sqrt()
    return rounding + 2 * svd_rows * UNIT[torch.float64] * diagonal[:, None] * diagonal[None, :]
