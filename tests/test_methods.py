"""One contract, every registered method (peft's shared-tester pattern), each with its task's model
(a classifier for fine-tuning methods, a masked-LM model for pre-training methods)."""

import copy

import pytest
import torch

from edgefed.methods import METHODS, AdapterSpec, load_trainable_state, trainable_state
from edgefed.tasks import TASKS
from tests.tiny import HIDDEN
from tests.tolerance import assert_as_accurate

SPEC = AdapterSpec(rank=4, alpha=8.0, target_modules=("query", "value"), head_modules=("classifier",))
FULL_MODEL_METHODS = ("fft", "fdapt")  # every parameter trains (pre-training: but the unused pooler)
HEADS = {"classification": "classifier", "masked-lm": "cls."}


def fresh(model_dir, seed=0, task="classification"):
    torch.manual_seed(seed)  # the same random head for every copy
    model, new_modules = TASKS.create(task).load_model(str(model_dir), num_labels=2)
    assert all(module.split(".")[0] == HEADS[task].rstrip(".") for module in new_modules)
    return model


def batch(seed=0, task="classification"):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (4, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    if task == "masked-lm":  # predict the tokens at a few positions
        labels = torch.full_like(ids, -100)
        labels[:, 2:5] = ids[:, 2:5]
    else:
        labels = torch.tensor([0, 1, 1, 0])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


@pytest.fixture(params=METHODS.names())
def method(request):
    return METHODS.create(request.param)


def test_adapting_keeps_the_pretrained_function(method, tiny_model_dir):
    if method.own_head_prefix is not None:
        pytest.skip("predicts with its own new heads, not the checkpoint's classifier")
    inputs = batch()
    pretrained = fresh(tiny_model_dir, task=method.task)
    expected = logits(pretrained, inputs)
    exact = logits(copy.deepcopy(pretrained).double(), inputs)
    adapted, _ = method.prepare_global(fresh(tiny_model_dir, task=method.task), SPEC)
    # Equal for most methods; FeDeRA's W_res + s·B·A is W up to one rounding per weight.
    assert_as_accurate(logits(adapted, inputs), expected, exact, "logits", terms=HIDDEN)


def test_client_built_from_setup_and_global_state_matches_the_server(method, tiny_model_dir):
    if method.splits_model:
        pytest.skip(
            "a split client holds no body; test_pretraining compares it with the server through the split"
        )
    server, setup = method.prepare_global(fresh(tiny_model_dir, seed=1, task=method.task), SPEC)
    client = method.adapt(fresh(tiny_model_dir, seed=2, task=method.task), SPEC, setup)  # another head init
    load_trainable_state(client, trainable_state(server))
    inputs = batch()
    assert torch.equal(logits(client, inputs), logits(server, inputs))  # the same weights, bit for bit


def test_training_changes_exactly_the_trainable_tensors(method, tiny_model_dir):
    model, _ = method.prepare_global(fresh(tiny_model_dir, task=method.task), SPEC)
    trainable = trainable_state(model)
    head = method.own_head_prefix or HEADS[method.task]
    assert head in " ".join(trainable), "the new head must train"
    # Tied weights (a masked-LM decoder and its word embeddings) count once, under the parameter's name.
    tensors = {*dict(model.named_parameters()), *dict(model.named_buffers())}
    before = {name: tensor.clone() for name, tensor in model.state_dict().items() if name in tensors}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):  # two steps: LoRA's A only moves once B is non-zero
        model(**batch(step, method.task)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable_names = set(trainable)
    assert changed <= trainable_names
    assert len(changed) >= len(trainable_names) * 0.9, sorted(trainable_names - changed)[:5]


def test_save_then_load_reproduces_the_trained_model(method, tiny_model_dir, tmp_path):
    model, setup = method.prepare_global(fresh(tiny_model_dir, task=method.task), SPEC)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    method.save(model, SPEC, setup, tmp_path / "adapter")
    loaded = method.load(tmp_path / "adapter", fresh(tiny_model_dir, task=method.task), SPEC)
    inputs = batch()
    # Saved in another form (FeDeRA: rank 2r on W₀): the same function, maybe in another order.
    exact = logits(copy.deepcopy(model).double(), inputs)
    assert_as_accurate(logits(loaded, inputs), logits(model, inputs), exact, "logits", terms=HIDDEN)


def test_low_rank_pairs_name_factors_of_the_right_shape(method, tiny_model_dir):
    model, _ = method.prepare_global(fresh(tiny_model_dir, task=method.task), SPEC)
    pairs = method.low_rank_pairs(model)
    state = trainable_state(model)
    if method.name not in ("lora", "federa"):
        assert pairs == []
        return
    assert len(pairs) == 2 * 2  # query and value in two layers
    for pair in pairs:
        assert state[pair.a].shape == (SPEC.rank, 32) and state[pair.b].shape == (32, SPEC.rank)
        assert pair.scale == SPEC.scale


def test_trainable_share_is_small_for_parameter_efficient_methods(method, tiny_model_dir):
    model, _ = method.prepare_global(fresh(tiny_model_dir, task=method.task), SPEC)
    share = sum(t.numel() for t in trainable_state(model).values()) / sum(
        p.numel() for p in model.parameters()
    )
    if method.name in FULL_MODEL_METHODS:
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        pooler = {name for name, _ in model.named_parameters() if ".pooler." in name}
        assert frozen == (pooler if method.task == "masked-lm" else set())
    elif method.task == "masked-lm":  # FFDAPT freezes a part, FedBERT federates the model's ends
        assert 0.0 < share < 1.0
    else:
        assert share < 0.05
