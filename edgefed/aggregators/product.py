"""Product-space aggregation of low-rank factors: average s·B_k·A_k, not A and B apart.

For each adapted layer the target is ΔW* = Σ_k p_k·s·B_k·A_k (B_k, A_k = global + the client's
delta). It is re-factored to rank r without forming the d_out×d_in matrix (the QR-then-small-SVD route of
FLoRA, arXiv 2409.05976, and FedEx-LoRA, arXiv 2410.09432, which aggregate in product space too):

    B_cat = [p_1·s·B_1 | … | p_K·s·B_K]   [d_out, K·r]      A_cat = [A_1; …; A_K]   [K·r, d_in]
    Q_B, R_B = qr(B_cat)      Q_A, R_A = qr(A_catᵀ)      U, Σ, Vᵀ = svd(R_B·R_Aᵀ)
    B = Q_B·U_r·√(Σ_r/s)      A = √(Σ_r/s)·(Q_A·V_r)ᵀ

so s·B·A is the best rank-r approximation of ΔW* (Eckart–Young), and exactly ΔW* whenever ΔW* has
rank ≤ r. The singular values are split evenly between the factors, FeDeRA's balanced gauge.
Cost per layer: O((d_in + d_out)·(K·r)²) in float64. Tensors outside a factor pair (the head,
biases) are averaged as in FedAvg.
"""

from collections.abc import Sequence

import torch

from edgefed.aggregators.base import (
    AGGREGATORS,
    Aggregator,
    ClientUpdate,
    State,
    client_weights,
    weighted_mean_step,
)
from edgefed.methods.base import LowRankPair


@AGGREGATORS.register("product")
class ProductAggregator(Aggregator):
    name = "product"

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], pairs: Sequence[LowRankPair]
    ) -> State:
        paired = {key for pair in pairs for key in (pair.a, pair.b)}
        result = weighted_mean_step(global_state, updates, [key for key in global_state if key not in paired])
        weights = client_weights(updates)
        for pair in pairs:
            a_clients = [global_state[pair.a].double() + u.delta[pair.a].double() for u in updates]
            b_clients = [global_state[pair.b].double() + u.delta[pair.b].double() for u in updates]
            a, b = refactor_mean_product(a_clients, b_clients, weights, pair.scale)
            result[pair.a] = a.to(global_state[pair.a].dtype)
            result[pair.b] = b.to(global_state[pair.b].dtype)
        return result


def refactor_mean_product(
    a_clients: Sequence[torch.Tensor],
    b_clients: Sequence[torch.Tensor],
    weights: Sequence[float],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, d_in], B [d_out, r]) with s·B·A the best rank-r approximation of Σ_k w_k·s·B_k·A_k."""
    rank, d_in = a_clients[0].shape
    d_out = b_clients[0].shape[0]
    # K·r ≥ r and r ≤ min(d_in, d_out), so the small SVD always has at least r singular values.
    b_cat = torch.cat([w * scale * b for w, b in zip(weights, b_clients, strict=True)], dim=1)
    a_cat = torch.cat(list(a_clients), dim=0)
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T)
    root = torch.sqrt(sigma[:rank] / scale)
    b = (q_b @ u[:, :rank]) * root
    a = root[:, None] * (q_a @ vh[:rank].T).T
    assert b.shape == (d_out, rank) and a.shape == (rank, d_in)
    return a, b
