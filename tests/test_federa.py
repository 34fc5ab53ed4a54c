"""FeDeRA: SVD initialisation on the server, exact round-0 function, PiSSA equivalence, exact saving."""

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from edgefed.errors import EdgefedError
from edgefed.methods import METHODS, AdapterSpec, trainable_state
from edgefed.methods.federa import residual_from, svd_init
from edgefed.methods.lora import lora_layers
from edgefed.models import load_classifier, load_tokenizer


def test_svd_init_factors_reconstruct_the_weight():
    torch.manual_seed(0)
    weight = torch.randn(48, 40)
    a, b = svd_init(weight, rank=6, scale=0.5)
    residual = residual_from(weight, a, b, scale=0.5)
    assert a.shape == (6, 40) and b.shape == (48, 6)
    torch.testing.assert_close(residual + 0.5 * b @ a, weight, atol=1e-5, rtol=0)
    u, s, vh = torch.linalg.svd(weight.double())
    torch.testing.assert_close((0.5 * b @ a).double(), (u[:, :6] * s[:6]) @ vh[:6], atol=1e-5, rtol=0)
    # Balanced: both factors carry sqrt(S/scale), so A·Aᵀ = B ᵀ·B = diag(S/scale).
    torch.testing.assert_close(a @ a.T, b.T @ b, atol=1e-4, rtol=1e-4)
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
    torch.testing.assert_close(single, weight - 0.25 * b @ a, atol=1e-5, rtol=0)


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
        got = adapted(**minilm_inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
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
    for name, layer in pissa_layers.items():
        a_ref, b_ref = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a, b = setup[f"{name}.lora_A"], setup[f"{name}.lora_B"]
        signs = torch.sign((a * a_ref).sum(dim=1))
        assert torch.all(signs == torch.sign((b * b_ref).sum(dim=0))), "A and B flip together"
        torch.testing.assert_close(a * signs[:, None], a_ref, atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(b * signs, b_ref, atol=2e-4, rtol=1e-3)
        ours_base = dict(lora_layers(ours))[name].get_base_layer().weight
        torch.testing.assert_close(ours_base, layer.get_base_layer().weight, atol=2e-5, rtol=0)


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
        torch.testing.assert_close(
            loaded(**inputs).logits, model.eval()(**inputs).logits, atol=1e-5, rtol=1e-5
        )
