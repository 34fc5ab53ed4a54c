"""FeDeRA (Yan et al., arXiv 2404.18848): LoRA whose factors start from the SVD of the pre-trained weight.

Per adapted weight W₀ [d_out, d_in], with s = α/r (PiSSA, arXiv 2404.02948, starts the same way):

    U, S, Vᵀ = svd(W₀)                       the server computes it once, in float64
    B₀ = U_r·diag(√(S_r/s))   A₀ = diag(√(S_r/s))·V_rᵀ
    W_res = W₀ − s·B₀·A₀                     frozen base during federated training

so at round 0 the adapted layer computes W_res·x + s·B₀·A₀·x = W₀·x. Singular vectors are defined
only up to sign (and an SVD's signs differ between libraries and machines), so clients never run an
SVD: the server fixes the signs (the largest-magnitude entry of each left singular vector positive)
and ships A₀ and B₀ with the sha256
of W_res. Each client forms W_res from its own copy of W₀ with `residual_from`, whose float64
element-wise arithmetic in a fixed order is correctly rounded on every IEEE machine, and checks the
digest, so every client trains on bit-identical frozen weights — or learns at once that it loaded a
different model. Shipping the recipe instead of W_res itself keeps the one-off setup at
2·r·(d_in + d_out) values per layer instead of d_in·d_out.

This is peft's PiSSA initialisation (`init_lora_weights="pissa"`): same factors up to the sign of
each singular pair (tests/test_federa.py checks it). FeDeRA's contribution is the federated setting.

Saving: the trained adapter lives on W_res, not on W₀. It is written as an equivalent standard
LoRA of rank 2r on the original W₀ — B' = [B | −B₀], A' = [A ; A₀], α' = 2α — so that
`PeftModel.from_pretrained(original_model, adapter_dir)` reproduces the trained model exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from edgefed.errors import EdgefedError
from edgefed.methods.base import METHODS, AdapterSpec, SetupState
from edgefed.methods.lora import ADAPTER_NAME, LoRA, lora_layers


def svd_init(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ [r, d_in], B₀ [d_out, r]) in the weight's dtype: the top-r singular triplets, split evenly."""
    if rank > min(weight.shape):
        raise EdgefedError(f"rank {rank} exceeds the smaller dimension of a {tuple(weight.shape)} weight")
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    pivots = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivots, torch.arange(rank)])
    u, vh = u * signs, vh * signs[:, None]
    root = torch.sqrt(s / scale)
    return (root[:, None] * vh).to(weight.dtype), (u * root).to(weight.dtype)


def residual_from(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W₀ − s·B₀·A₀, bit-identical on every machine: rank-1 terms added in float64 in a fixed order.

    A matmul would let each BLAS choose its own summation order (and FMA), so two clients could
    disagree in the last bit; element-wise IEEE operations are correctly rounded everywhere.
    """
    product = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    for k in range(a.shape[0]):
        product += b64[:, k, None] * a64[None, k, :]
    return (weight.detach().to(torch.float64) - scale * product).to(weight.dtype)


def digest(tensor: torch.Tensor) -> torch.Tensor:
    """sha256 of a tensor's bytes, as a uint8 tensor so that it travels with the setup state."""
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return torch.frombuffer(bytearray(hashlib.sha256(data).digest()), dtype=torch.uint8)


@torch.no_grad()
def install(layer: LoraLayer, a: torch.Tensor, b: torch.Tensor, residual: torch.Tensor) -> None:
    layer.lora_A[ADAPTER_NAME].weight.copy_(a)
    layer.lora_B[ADAPTER_NAME].weight.copy_(b)
    layer.get_base_layer().weight.copy_(residual)


@METHODS.register("federa")
class FeDeRA(LoRA):
    name = "federa"
    default_lr = 3e-3

    def prepare_global(self, model: nn.Module, spec: AdapterSpec) -> tuple[nn.Module, SetupState]:
        peft_model = super().adapt(model, spec, {})
        setup: SetupState = {}
        for name, layer in lora_layers(peft_model):
            weight = layer.get_base_layer().weight
            a, b = svd_init(weight, spec.rank, spec.scale)
            residual = residual_from(weight, a, b, spec.scale)
            setup.update(
                {f"{name}.lora_A": a, f"{name}.lora_B": b, f"{name}.residual_sha256": digest(residual)}
            )
            install(layer, a, b, residual)
        return peft_model, setup

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        """Install A₀, B₀ and W_res, formed here from this model's own W₀ and checked against the digest."""
        peft_model = super().adapt(model, spec, {})
        for name, layer in lora_layers(peft_model):
            try:
                a, b, expected = (setup[f"{name}.{part}"] for part in ("lora_A", "lora_B", "residual_sha256"))
            except KeyError:
                raise ValueError(f"FeDeRA setup state lacks the factors of {name}") from None
            base = layer.get_base_layer().weight
            residual = residual_from(base, a, b, spec.scale)
            if not torch.equal(digest(residual), expected.cpu()):
                raise EdgefedError(
                    f"{name}: the residual W₀ − s·B₀·A₀ formed from this client's pre-trained weight does "
                    "not match the server's checksum; server and clients must load the same model"
                )
            install(layer, a, b, residual)
        return peft_model

    def save(self, model: nn.Module, spec: AdapterSpec, setup: SetupState, out_dir: Path) -> None:
        state = get_peft_model_state_dict(model)
        for name, _ in lora_layers(model):
            # peft's saved keys drop the adapter name: "...query.lora_A.weight".
            key = name.removeprefix("base_model.model.")
            a_key, b_key = f"base_model.model.{key}.lora_A.weight", f"base_model.model.{key}.lora_B.weight"
            state[a_key] = torch.cat([state[a_key], setup[f"{name}.lora_A"]], dim=0).contiguous()
            state[b_key] = torch.cat([state[b_key], -setup[f"{name}.lora_B"]], dim=1).contiguous()
        config = dataclasses.replace(
            model.peft_config[ADAPTER_NAME],
            r=2 * spec.rank,
            lora_alpha=2 * spec.alpha,
            init_lora_weights=True,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out_dir)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            out_dir / "adapter_model.safetensors",
        )
