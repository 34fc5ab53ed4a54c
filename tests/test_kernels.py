"""Kernels against a float64 reference on fresh random inputs, outputs poisoned (NaN) before each run.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py); tests that need
CUDA are marked and skipped on the CPU.
"""

import copy

import pytest
import torch

from edgefed.kernels import dequantize_blockwise, lora_linear, quantize_blockwise, weighted_sum
from edgefed.kernels.backend import interpreting
from edgefed.kernels.lora import launch_backward_ds_db, launch_backward_dx, launch_forward
from edgefed.kernels.reduce import _triton_weighted_sum
from tests.tiny import HIDDEN
from tests.tolerance import UNIT, assert_as_accurate, assert_as_accurate_in_norm, assert_within, gamma

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()), reason="needs CUDA or TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (tokens, d_in, d_out, rank): ragged sizes, d_in not a multiple of 16, rank 1 to 64.
SHAPES = [
    (1, 24, 20, 1),
    (37, 40, 20, 4),
    (100, 24, 48, 8),
    (19, 72, 33, 16),
    (5, 64, 33, 64),
    (130, 17, 65, 3),
]


def inputs(tokens, d_in, d_out, rank, dtype, seed):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE)

    return (
        rand(tokens, d_in).to(dtype),
        rand(d_out, d_in, scale=d_in**-0.5).to(dtype),
        rand(rank, d_in, scale=0.3),
        rand(d_out, rank, scale=0.3),
        rand(d_out).to(dtype),
        rand(tokens, d_out).to(dtype),
    )


def reference(x, weight, a, b, bias, grad_y, scale):
    """Float64 forward and backward with autograd."""
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y = x64 @ weight.double().T + scale * (x64 @ a64.T) @ b64.T + bias.double()
    y.backward(grad_y.double())
    return y.detach(), x64.grad, a64.grad, b64.grad


def assert_written_within(got, expected, bound, what=""):
    assert torch.isfinite(got).all(), f"{what}: an output element was not written (poison survived)"
    assert_within(got.cpu(), expected.cpu(), bound.cpu() if isinstance(bound, torch.Tensor) else bound, what)


def cast_unit(dtype):
    """The relative error of one cast to `dtype`: u, except that Triton's interpreter converts to
    bfloat16 by truncation (toward zero: up to one ulp, 2u), not to nearest."""
    return 2 * UNIT[dtype] if dtype == torch.bfloat16 and interpreting() else UNIT[dtype]


def magnitude(p, q):
    """|p|·|q| in float64: what a product's rounding errors are relative to."""
    return p.double().abs() @ q.double().abs()


def lora_bounds(x, weight, a, b, bias, grad_y, scale, y_ref):
    """Elementwise bounds on each output of the fused kernels, from what they round (triton_lora.py):
    float32 accumulation over k terms (γ_k; products of half-precision inputs are exact in float32),
    and u_d of the output dtype for each cast to it — A and S = x·Aᵀ and B before the LoRA product, dS
    and A before dx's, the outputs y and dx — against the float64 reference on the same (already
    rounded) x and W. Chained products carry their inner product's bound through the outer one."""
    dtype = x.dtype
    u_d = cast_unit(dtype)
    tokens, d_in = x.shape
    d_out, rank = b.shape
    s_magnitude = magnitude(x, a.T)  # |x|·|Aᵀ|
    lora = scale * magnitude(s_magnitude, b.T)
    y = gamma(d_in + 2) * magnitude(x, weight.T) + (3 * u_d + gamma(d_in + rank + 2)) * lora
    y = y + gamma(2) * bias.double().abs() + u_d * y_ref.abs()
    s = (u_d + gamma(d_in)) * s_magnitude
    ds_magnitude = scale * magnitude(grad_y, b)  # |dY|·|B|·s
    ds = (u_d + gamma(d_out)) * ds_magnitude
    db = gamma(tokens + 1) * scale * magnitude(grad_y.T, s_magnitude) + scale * magnitude(grad_y.T, s)
    dx = gamma(d_out + rank + 1) * (magnitude(grad_y, weight) + magnitude(ds_magnitude, a))
    dx = (
        dx
        + 2 * u_d * magnitude(ds_magnitude, a)
        + magnitude(ds, a)
        + u_d * (magnitude(grad_y, weight) + magnitude(ds_magnitude, a))
    )
    da = gamma(tokens) * magnitude(ds_magnitude.T, x) + magnitude(ds.T, x)
    return {"y": y, "s": s, "ds": ds, "db": db, "dx": dx, "da": da}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-in{}-out{}-r{}".format(*s))
def test_fused_kernels_match_float64_with_poisoned_outputs(shape, dtype):
    tokens, d_in, d_out, rank = shape
    x, weight, a, b, bias, grad_y = inputs(*shape, dtype, seed=sum(shape))
    y_ref, dx_ref, da_ref, db_ref = reference(x, weight, a, b, bias, grad_y, 0.5)
    bounds = lora_bounds(x, weight, a, b, bias, grad_y, 0.5, y_ref)
    poison = float("nan")
    y = torch.full((tokens, d_out), poison, dtype=dtype, device=DEVICE)
    s = torch.full((tokens, rank), poison, device=DEVICE)
    launch_forward(x, weight, a, b, 0.5, bias, y=y, s=s)
    assert_written_within(y, y_ref, bounds["y"], "y")
    assert_written_within(s, x.double() @ a.double().T, bounds["s"], "S")
    ds = torch.full((tokens, rank), poison, device=DEVICE)
    ds, db = launch_backward_ds_db(grad_y, b, s, 0.5, ds=ds)
    assert_written_within(ds, 0.5 * grad_y.double() @ b.double(), bounds["ds"], "dS")
    assert_written_within(db, db_ref, bounds["db"], "dB")
    dx = torch.full((tokens, d_in), poison, dtype=dtype, device=DEVICE)
    launch_backward_dx(grad_y, weight, ds, a, dx=dx)
    assert_written_within(dx, dx_ref, bounds["dx"], "dx")
    assert_written_within(ds.T @ x.float(), da_ref, bounds["da"], "dA")


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autograd_through_lora_linear_with_leading_dims(backend):
    x, weight, a, b, bias, _ = inputs(24, 40, 36, 8, torch.float32, seed=7)
    x = x.reshape(2, 3, 4, 40).requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    y = lora_linear(x, weight, a, b, 2.0, bias, backend=backend)
    assert y.shape == (2, 3, 4, 36)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y.backward(grad_y)
    y_ref, dx_ref, da_ref, db_ref = reference(
        x.reshape(24, 40), weight, a, b, bias, grad_y.reshape(24, 36), 2.0
    )
    bounds = lora_bounds(
        x.detach().reshape(24, 40), weight, a.detach(), b.detach(), bias, grad_y.reshape(24, 36), 2.0, y_ref
    )
    assert_written_within(y.detach().reshape(24, 36), y_ref, bounds["y"], "y")
    assert_written_within(x.grad.reshape(24, 40), dx_ref, bounds["dx"], "dx")
    assert_written_within(a.grad, da_ref, bounds["da"], "dA")
    assert_written_within(b.grad, db_ref, bounds["db"], "dB")


@needs_triton
def test_no_input_gradient_is_computed_when_x_needs_none():
    x, weight, a, b, bias, _ = inputs(16, 32, 32, 4, torch.float32, seed=3)
    a.requires_grad_()
    lora_linear(x, weight, a, b, 1.0, bias, backend="triton").sum().backward()
    assert x.grad is None and a.grad is not None


def test_shape_mismatch_is_a_clear_error():
    x, weight, a, b, bias, _ = inputs(4, 32, 16, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="shapes do not chain"):
        lora_linear(x, weight, a.T, b, 1.0, bias)


def client_deltas(count, size, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, generator=generator) * (k + 1)).to(dtype).to(DEVICE) for k in range(count)]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weighted_sum_of_float_deltas(backend, dtype):
    deltas, weights = client_deltas(5, 3001, dtype, seed=11), [0.1, 0.3, 0.2, 0.25, 0.15]
    expected = sum(w * d.double() for w, d in zip(weights, deltas, strict=True))
    got = weighted_sum(deltas, weights, backend=backend)
    assert got.dtype == torch.float32
    # float32 weights (u each), products and a sum of K terms: γ_{K+1} of Σ|w_k·d_k|.
    bound = gamma(len(deltas) + 1) * sum(w * d.double().abs() for w, d in zip(weights, deltas, strict=True))
    assert_written_within(got, expected, bound)
    assert_written_within(weighted_sum(torch.stack(deltas), weights, backend=backend), expected, bound)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_weighted_sum_dequantises_blockwise_deltas(backend, bits):
    deltas, weights = client_deltas(4, 1000, torch.float32, seed=bits), [0.4, 0.1, 0.3, 0.2]
    encoded = [quantize_blockwise(delta, bits=bits, block=64) for delta in deltas]
    q, scales = torch.stack([e[0] for e in encoded]), torch.stack([e[1] for e in encoded])
    decoded = [dequantize_blockwise(*e, numel=1000).double() for e in encoded]
    expected = sum(w * d for w, d in zip(weights, decoded, strict=True))
    got = weighted_sum(q, weights, scales, backend=backend)
    assert got.shape == (1024,)  # padded to whole blocks
    # Dequantising (q·scale) adds one rounding to each term of the weighted sum: γ_{K+2}.
    bound = gamma(len(deltas) + 2) * sum(w * d.abs() for w, d in zip(weights, decoded, strict=True))
    assert_written_within(got[:1000], expected, bound)


@needs_triton
def test_weighted_sum_kernel_writes_every_output():
    deltas = torch.stack(client_deltas(3, 20000, torch.float32, seed=5))
    out = torch.full((20000,), float("nan"), device=DEVICE)
    _triton_weighted_sum(deltas, torch.tensor([0.2, 0.3, 0.5], device=DEVICE), None, out=out)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, device=DEVICE)[:, None]
    expected = (deltas.double() * weights).sum(0)
    assert_written_within(out, expected, gamma(3 + 1) * (deltas.double().abs() * weights).sum(0))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantisation_error_is_within_half_a_step(bits):
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    values[64:128] = 0.0  # an all-zero block
    q, scales = quantize_blockwise(values, bits=bits, block=64)
    assert q.numel() == (1024 if bits == 8 else 512) and scales.numel() == 16
    decoded = dequantize_blockwise(q, scales, numel=1000)
    step = scales.repeat_interleave(64)[:1000]
    # Half a step, plus the rounding of values/scale (which may move a value across a half step by u of
    # it) and of q·scale on the way back.
    assert torch.all(
        (decoded - values).abs() <= step / 2 + UNIT[torch.float32] * (values.abs() + decoded.abs())
    )
    assert torch.all(decoded[64:128] == 0)


@needs_cuda
def test_cuda_auto_backend_matches_torch_on_a_bert_layer():
    x, weight, a, b, bias, grad_y = inputs(4096, 768, 768, 8, torch.bfloat16, seed=2)
    fused = lora_linear(x, weight, a, b, 2.0, bias)
    plain = lora_linear(x, weight, a, b, 2.0, bias, backend="torch")
    y_ref = reference(x, weight, a, b, bias, grad_y, 2.0)[0]
    bound = lora_bounds(x, weight, a, b, bias, grad_y, 2.0, y_ref)["y"]
    assert_written_within(fused, y_ref, bound, "fused")
    # torch rounds each of its three products and the sum to bfloat16 as well: 2u more on each term.
    extra = 2 * UNIT[torch.bfloat16] * (magnitude(x, weight.T) + 2.0 * magnitude(magnitude(x, a.T), b.T))
    assert_written_within(plain, y_ref, bound + extra, "torch")


@needs_triton
@pytest.mark.parametrize("method", ["lora", "federa"])
def test_peft_layers_routed_through_the_fused_kernel_train_the_same(method, tiny_model_dir):
    from edgefed.methods import METHODS, AdapterSpec
    from edgefed.methods.lora import use_fused_kernels
    from edgefed.models import load_classifier

    spec = AdapterSpec(rank=4, alpha=8.0)
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        model, _ = METHODS.create(method).prepare_global(load_classifier(str(tiny_model_dir), 2)[0], spec)
        with torch.no_grad():  # non-zero B, so the LoRA branch matters
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
        if fused:
            assert use_fused_kernels(model, backend="triton") == 4
        models.append(model.eval())
    models.append(copy.deepcopy(models[0]).double())  # peft's layers in float64: the reference
    batch = {"input_ids": torch.randint(1000, 3000, (3, 10)), "labels": torch.tensor([0, 1, 1])}
    losses = [model(**batch).loss for model in models]
    for loss in losses:
        loss.backward()
    peft_loss, fused_loss, exact_loss = (loss.detach() for loss in losses)
    # The fused kernels round in their own order: as accurate as peft's float32 layers.
    assert_as_accurate(fused_loss, peft_loss, exact_loss, "loss", terms=HIDDEN)
    peft_grads, fused_grads, exact_grads = (
        {n: p.grad for n, p in model.named_parameters() if p.requires_grad} for model in models
    )
    assert_as_accurate_in_norm(fused_grads, peft_grads, exact_grads, "gradients", terms=HIDDEN)


def test_cuda_block_configurations_compile_for_jetson_orin_and_fit_its_shared_memory():
    """Triton's ahead-of-time compiler needs no GPU: build every launched configuration for sm_87."""
    import json
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "edgefed.kernels.aot", "--arch", "87"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["shared"]) == 12
    too_big = {name: size for name, size in report["shared"].items() if size > report["limit"]}
    assert not too_big, f"over Orin's {report['limit']} bytes of shared memory per block: {too_big}"
