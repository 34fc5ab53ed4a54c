"""FeDeRA (Yan et al., arXiv 2404.18848): LoRA whose factors start from the SVD of the pre-trained weight.

Per adapted weight W₀ [d_out, d_in], with s = α/r (PAPERS.md §2.2):

    U, S, Vᵀ = svd(W₀)                       the server computes it once, in float64
    B₀ = U_r·diag(√(S_r/s))   A₀ = diag(√(S_r/s))·V_rᵀ
    W_res = W₀ − s·B₀·A₀                     frozen base during federated training

so at round 0 the adapted layer computes W_res·x + s·B₀·A₀·x = W₀·x. Singular vectors are defined
only up to sign, so clients never run an SVD: the server ships A₀, B₀ and W_res (the setup state)
and every client installs exactly those tensors (PAPERS.md §6.1). The server also fixes the signs
(largest-magnitude entry of each left singular vector positive) so that its output is canonical.

This is peft's PiSSA initialisation (`init_lora_weights="pissa"`): same factors up to the sign of
each singular pair (tests/test_federa.py checks it). FeDeRA's contribution is the federated setting.

Saving: the trained adapter lives on W_res, not on W₀. It is written as an equivalent standard
LoRA of rank 2r on the original W₀ — B' = [B | −B₀], A' = [A ; A₀], α' = 2α — so that
`PeftModel.from_pretrained(original_model, adapter_dir)` reproduces the trained model exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from edgefed.errors import EdgefedError
from edgefed.methods.base import METHODS, AdapterSpec, SetupState
from edgefed.methods.lora import ADAPTER_NAME, LoRA, lora_layers

# A client's own pre-trained weight must agree with the server's W_res + s·B₀·A₀ this closely
# (relative to the weight's largest entry); more means the client loaded a different model.
BASE_MISMATCH_TOLERANCE = 1e-4


def svd_init(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A₀ [r, d_in], B₀ [d_out, r], W_res [d_out, d_in]) in the weight's dtype."""
    if rank > min(weight.shape):
        raise EdgefedError(f"rank {rank} exceeds the smaller dimension of a {tuple(weight.shape)} weight")
    exact = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(exact, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    pivots = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivots, torch.arange(rank)])
    u, vh = u * signs, vh * signs[:, None]
    root = torch.sqrt(s / scale)
    b = u * root
    a = root[:, None] * vh
    residual = exact - scale * (b @ a)
    return a.to(weight.dtype), b.to(weight.dtype), residual.to(weight.dtype)


@METHODS.register("federa")
class FeDeRA(LoRA):
    name = "federa"
    default_lr = 2e-3

    def prepare_global(self, model: nn.Module, spec: AdapterSpec) -> tuple[nn.Module, SetupState]:
        peft_model = super().adapt(model, spec, {})
        setup: SetupState = {}
        for name, layer in lora_layers(peft_model):
            a, b, residual = svd_init(layer.get_base_layer().weight, spec.rank, spec.scale)
            setup.update({f"{name}.lora_A": a, f"{name}.lora_B": b, f"{name}.residual": residual})
        self._install(peft_model, setup, spec, check_base=False)
        return peft_model, setup

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        peft_model = super().adapt(model, spec, {})
        self._install(peft_model, setup, spec, check_base=True)
        return peft_model

    def _install(self, model: nn.Module, setup: SetupState, spec: AdapterSpec, check_base: bool) -> None:
        for name, layer in lora_layers(model):
            try:
                a, b, residual = (setup[f"{name}.{part}"] for part in ("lora_A", "lora_B", "residual"))
            except KeyError:
                raise ValueError(f"FeDeRA setup state lacks the factors of {name}") from None
            base = layer.get_base_layer().weight
            if check_base:
                own = base.detach().double()
                shipped = residual.double() + spec.scale * (b.double() @ a.double())
                error = (own - shipped).abs().max() / own.abs().max().clamp_min(1e-12)
                if error > BASE_MISMATCH_TOLERANCE:
                    raise EdgefedError(
                        f"{name}: this client's pre-trained weight differs from the server's "
                        f"(relative error {error:.2e}); both must load the same model"
                    )
            with torch.no_grad():
                layer.lora_A[ADAPTER_NAME].weight.copy_(a)
                layer.lora_B[ADAPTER_NAME].weight.copy_(b)
                base.copy_(residual)

    def save(self, model: nn.Module, spec: AdapterSpec, setup: SetupState, out_dir: Path) -> None:
        state = get_peft_model_state_dict(model)
        for name, _ in lora_layers(model):
            # peft's saved keys drop the adapter name: "...query.lora_A.weight".
            key = name.removeprefix("base_model.model.")
            a_key, b_key = f"base_model.model.{key}.lora_A.weight", f"base_model.model.{key}.lora_B.weight"
            state[a_key] = torch.cat([state[a_key], setup[f"{name}.lora_A"]], dim=0).contiguous()
            state[b_key] = torch.cat([state[b_key], -setup[f"{name}.lora_B"]], dim=1).contiguous()
        config = dataclasses.replace(
            model.peft_config[ADAPTER_NAME], r=2 * spec.rank, lora_alpha=2 * spec.alpha, init_lora_weights=True
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out_dir)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out_dir / "adapter_model.safetensors")
