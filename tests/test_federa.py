"""FeDeRA: SVD initialisation on the server, exact round-0 function, PiSSA equivalence, exact saving."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from edgefed.errors import EdgefedError
from edgefed.methods import METHODS, AdapterSpec, trainable_state
from edgefed.methods.federa import residual_from, svd_init
from edgefed.methods.lora import lora_layers
from edgefed.models import load_classifier, load_tokenizer
from tests.tolerance import (
    UNIT,
    assert_as_accurate,
    assert_within,
    balance_bound,
    float64_svd_error,
    gamma,
    product_bound,
    svd_error,
    truncation_error,
    vector_turn,
)

U32, U64 = UNIT[torch.float32], UNIT[torch.float64]


def test_svd_init_factors_reconstruct_the_weight():
    torch.manual_seed(0)
    weight = torch.randn(48, 40)
    a, b = svd_init(weight, rank=6, scale=0.5)
    residual = residual_from(weight, a, b, scale=0.5)
    assert a.shape == (6, 40) and b.shape == (48, 6)
    a64, b64 = a.double(), b.double()
    # The residual is W − s·B·A of the float32 factors, exact in float64, then rounded once: adding the
    # product back in float64 gives W up to that rounding (u·|R|) and float64's own.
    assert_within(
        residual.double() + 0.5 * b64 @ a64,
        weight,
        U32 * residual.abs() + 0.5 * product_bound(b64, a64, torch.float64),
    )
    # s·B·A is the rank-6 truncated SVD up to rounding each factor to float32 ((2u + u²)·|B|·|A|) and
    # the float64 SVD's own error (the test's SVD and svd_init's are separate LAPACK calls).
    u, s, vh = torch.linalg.svd(weight.double())
    truncation = truncation_error(s, 6, float64_svd_error(weight))
    assert_within(
        0.5 * b64 @ a64,
        (u[:, :6] * s[:6]) @ vh[:6],
        (2 * U32 + U32**2) * 0.5 * (b64.abs() @ a64.abs()) + truncation,
    )
    # Balanced: both factors carry sqrt(S/scale), so A·Aᵀ = Bᵀ·B = diag(S/scale).
    assert_within(a64 @ a64.T, b64.T @ b64, balance_bound(a, b, svd_rows=48))
    with pytest.raises(EdgefedError, match="exceeds"):
        svd_init(weight, rank=41, scale=1.0)


def test_residual_is_bit_identical_whatever_the_thread_count():
    torch.manual_seed(1)
    weight, a, b = torch.randn(300, 200), torch.randn(16, 200), torch.randn(300, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = residual_from(weight, a, b, 0.25)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(residual_from(weight, a, b, 0.25), single)
    # W − s·B·A computed exactly in float64 and rounded once to float32.
    exact = weight.double() - 0.25 * b.double() @ a.double()
    assert_within(single, exact, U32 * exact.abs() + 0.25 * product_bound(b, a, torch.float64))


def minilm(minilm_path, seed=0):
    torch.manual_seed(seed)
    return load_classifier(minilm_path, num_labels=2)[0]


@pytest.fixture(scope="module")
def minilm_inputs(minilm_path):
    tokenizer = load_tokenizer(minilm_path)
    return tokenizer(
        ["a gorgeous , witty , seductive movie .", "the acting is dreadful ."],
        padding=True,
        return_tensors="pt",
    )


def test_round_zero_minilm_computes_what_the_pretrained_model_computes(minilm_path, minilm_inputs):
    spec = AdapterSpec(rank=8, alpha=8.0)
    pretrained = minilm(minilm_path).eval()
    adapted, setup = METHODS.create("federa").prepare_global(minilm(minilm_path), spec)
    adapted.eval()
    with torch.no_grad():
        expected = pretrained(**minilm_inputs).logits
        exact = pretrained.double()(**minilm_inputs).logits
        got = adapted(**minilm_inputs).logits
    # W_res + s·B·A differs from W by one rounding per weight: as accurate as the plain model's float32.
    assert_as_accurate(got, expected, exact, "round-0 logits", terms=pretrained.config.hidden_size)
    # The factors really are the principal components: the residual is not the weight.
    assert all(setup[key].abs().max() > 0.1 for key in setup if key.endswith("lora_B"))


def test_factors_match_peft_pissa_up_to_sign(minilm_path):
    """Same A, B and residual as peft's init_lora_weights="pissa", each singular pair up to a common sign."""
    spec = AdapterSpec(rank=8, alpha=16.0)  # scale 2: both divide the singular values by it
    ours, setup = METHODS.create("federa").prepare_global(minilm(minilm_path), spec)
    pissa = get_peft_model(
        minilm(minilm_path),
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["query", "value"],
            init_lora_weights="pissa",
            task_type=TaskType.SEQ_CLS,
        ),
    )
    pissa_layers = dict(lora_layers(pissa))
    assert pissa_layers.keys() == dict(lora_layers(ours)).keys()
    original = minilm(minilm_path)
    for name, layer in pissa_layers.items():
        a_ref, b_ref = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        a, b = setup[f"{name}.lora_A"].double(), setup[f"{name}.lora_B"].double()
        signs = torch.sign((a * a_ref).sum(dim=1))
        assert torch.all(signs == torch.sign((b * b_ref).sum(dim=0))), "A and B flip together"
        # peft runs its SVD in float32, we in float64: the difference is peft's SVD error E (measured:
        # this is the very call peft makes) turning each singular pair and the top-8 subspace.
        weight = original.get_submodule(name.removeprefix("base_model.model.")).weight.detach()
        sigma = torch.linalg.svdvals(weight.double())
        error = svd_error(weight, torch.linalg.svd(weight, full_matrices=False)) + float64_svd_error(weight)
        for i in range(8):
            # A's row i is √(σᵢ/s)·vᵢ: the vector turns (Wedin) and σᵢ moves by ≤ ‖E‖ (Weyl), plus
            # float32 rounding of both factors and peft's sqrt and product (a few u of the row).
            root = (sigma[i] / 2).sqrt().item()
            for ours_row, theirs_row in ((a[i] * signs[i], a_ref[i]), (b[:, i] * signs[i], b_ref[:, i])):
                bound = root * vector_turn(sigma, i, error) + error / (4 * root) + 8 * U32 * root
                assert (ours_row - theirs_row).norm() <= bound, (name, i)
        # The residuals differ by the change of the rank-8 truncation (in the spectral norm, where the
        # theory bounds it) and the float32 rounding of each residual and of peft's B·A product.
        ours_base = dict(lora_layers(ours))[name].get_base_layer().weight.double()
        theirs_base = layer.get_base_layer().weight.double()
        rounding = U32 * (ours_base.abs() + theirs_base.abs()) + 2 * (U32 + gamma(8)) * (
            b_ref.abs() @ a_ref.abs()
        )
        spectral = torch.linalg.matrix_norm(ours_base - theirs_base, ord=2).item()
        assert spectral <= truncation_error(sigma, 8, error) + rounding.norm().item(), name


def test_clients_never_run_an_svd(tiny_model_dir, monkeypatch):
    spec = AdapterSpec(rank=4, alpha=4.0)
    federa = METHODS.create("federa")
    torch.manual_seed(0)
    server, setup = federa.prepare_global(load_classifier(str(tiny_model_dir), 2)[0], spec)

    def no_svd(*args, **kwargs):
        raise AssertionError("a client ran an SVD")

    for name in ("svd", "svd_lowrank", "svdvals"):
        monkeypatch.setattr(torch.linalg, name, no_svd, raising=False)
    monkeypatch.setattr(torch, "svd_lowrank", no_svd)
    client = federa.adapt(load_classifier(str(tiny_model_dir), 2)[0], spec, setup)
    server_layers = dict(lora_layers(server))
    for name, layer in lora_layers(client):
        assert torch.equal(layer.lora_A["default"].weight, setup[f"{name}.lora_A"])
        assert torch.equal(layer.get_base_layer().weight, server_layers[name].get_base_layer().weight)
    # The setup is the factors and a checksum, not the residual matrices themselves.
    assert sum(t.numel() for t in setup.values()) < sum(p.numel() for p in server.parameters()) / 100


def test_a_client_with_a_different_base_model_is_refused(tiny_model_dir, minilm_path):
    spec = AdapterSpec(rank=4, alpha=4.0)
    federa = METHODS.create("federa")
    _, setup = federa.prepare_global(load_classifier(str(tiny_model_dir), 2)[0], spec)
    other = load_classifier(str(tiny_model_dir), 2)[0]
    with torch.no_grad():
        other.bert.encoder.layer[1].attention.self.value.weight.mul_(1.01)
    with pytest.raises(
        EdgefedError, match=r"layer\.1\.attention\.self\.value: the residual .* server's checksum"
    ):
        federa.adapt(other, spec, setup)


def test_saved_adapter_loads_on_the_original_model_with_peft(tiny_model_dir, tmp_path):
    spec = AdapterSpec(rank=4, alpha=8.0)
    federa = METHODS.create("federa")
    torch.manual_seed(0)
    model, setup = federa.prepare_global(load_classifier(str(tiny_model_dir), 2)[0], spec)
    with torch.no_grad():
        for param in trainable_state(model):
            model.get_parameter(param).add_(0.1 * torch.randn_like(model.get_parameter(param)))
    federa.save(model, spec, setup, tmp_path / "adapter")
    original = load_classifier(str(tiny_model_dir), 2)[0]
    loaded = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].r == 2 * spec.rank
    inputs = {"input_ids": torch.randint(1000, 3000, (3, 9))}
    with torch.no_grad():
        got, expected = loaded(**inputs).logits, model.eval()(**inputs).logits
        exact = copy.deepcopy(model).double()(**inputs).logits
    # Rank 2r on W₀ and rank r on W_res are one function computed in two orders.
    assert_as_accurate(got, expected, exact, "reloaded logits", terms=model.config.hidden_size)
