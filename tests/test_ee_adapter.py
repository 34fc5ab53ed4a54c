"""Attention-based early-exit adapters: identity at init, depth truncation, training, padding, save/load."""

import copy
import json
import re

import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification, BertModel

from edgefed.methods import METHODS, AdapterSpec, trainable_state
from edgefed.methods.ee_adapter import EarlyExitModel, exits_loss
from tests.tiny import HIDDEN, tiny_bert_config
from tests.tolerance import assert_as_accurate

SPEC = AdapterSpec(rank=4)
NUM_LAYERS = 4
NUM_LABELS = 3
TRAINABLE_NAME = re.compile(r"^(adapters|exits)\.(\d+)\.")


def tiny_config() -> BertConfig:
    return tiny_bert_config(
        vocab_size=100, num_hidden_layers=NUM_LAYERS, max_position_embeddings=64, num_labels=NUM_LABELS
    )


def classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config())


def early_exit(seed: int = 0) -> EarlyExitModel:
    model = METHODS.create("ee-adapter").adapt(classifier(seed), SPEC, {})
    assert isinstance(model, EarlyExitModel)
    return model


def batch(seed: int = 0, rows: int = 6, length: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 3:] = 0
    ids[mask == 0] = 0
    labels = torch.randint(0, NUM_LABELS, (rows,), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def block_of(name: str) -> int:
    match = TRAINABLE_NAME.match(name)
    assert match, name
    return int(match.group(2))


def test_backbone_frozen_and_trainable_names_carry_their_block():
    model = early_exit()
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert all(TRAINABLE_NAME.match(name) for name in trainable), trainable
    assert {block_of(name) for name in trainable} == set(range(NUM_LAYERS))
    assert all(not param.requires_grad for param in model.backbone.parameters())
    names = [name for name, _ in model.named_parameters()]
    assert not any("classifier" in name or "pooler" in name for name in names)
    # The learnable tokens live inside their block's adapter.
    assert {"adapters.2.c_meta", "adapters.2.pos_embedding"} <= set(trainable)
    assert model.adapters[2].pos_embedding.shape == (1, 2 + 2, 32)


def test_at_init_every_block_sees_the_plain_encoders_hidden_states():
    model = early_exit().eval()
    inputs = batch()

    def record(into):
        return lambda module, args: into.append(args[0].detach().clone())

    seen, plain = [], []
    handles = [block.register_forward_pre_hook(record(seen)) for block in model.blocks]
    with torch.no_grad():
        output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    for handle in handles:
        handle.remove()
    reference = BertModel(tiny_config(), add_pooling_layer=False).eval()
    reference.load_state_dict(model.backbone.state_dict())
    handles = [block.register_forward_pre_hook(record(plain)) for block in reference.encoder.layer]
    with torch.no_grad():
        reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    for handle in handles:
        handle.remove()
    assert len(seen) == len(plain) == NUM_LAYERS
    for ours, theirs in zip(seen, plain, strict=True):  # the same blocks on the same inputs: bit for bit
        assert torch.equal(ours, theirs)
    assert len(output.exit_logits) == NUM_LAYERS and output.loss is None
    assert output.logits.shape == (6, NUM_LABELS)
    assert torch.equal(output.logits, output.exit_logits[-1])


@pytest.mark.parametrize("modulation", [True, False])
def test_trained_adapters_read_pooled_history_and_shift_the_first_token_only_when_modulating(modulation):
    model = early_exit().eval()
    model.modulation = modulation  # off by default: the blocks compute what the pre-trained ones do
    with torch.no_grad():  # stand-in for training: the zero-initialised projections move
        for param in model.adapters.parameters():
            param.add_(0.1 * torch.randn_like(param))
    block_in, block_out, adapter_in, adapter_out = [], [], [], []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: block_in.append(args[0]))
        block.register_forward_hook(lambda module, args, out: block_out.append(out))

    def record_adapter(module, args, out):  # returns None: a hook's return value would replace the output
        adapter_in.append(args[0])
        adapter_out.append(out)

    for adapter in model.adapters:
        adapter.register_forward_hook(record_adapter)
    inputs = batch()
    with torch.no_grad():
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    for i in range(NUM_LAYERS - 1):
        fed = block_in[i + 1]
        # Modulating, the first token moves by what the adapter made of the block's pooled state.
        shift = adapter_out[i][:, -1] - adapter_in[i][:, -1] if modulation else 0
        # The model adds the shift in the order written here, so the results agree bit for bit.
        assert torch.equal(fed[:, 0], block_out[i][:, 0]) != modulation
        assert torch.equal(fed[:, 0], block_out[i][:, 0] + shift)
        assert torch.equal(fed[:, 1:], block_out[i][:, 1:])
    history = adapter_in[-1]
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = torch.stack([(out * mask).sum(1) / mask.sum(1) for out in block_out], dim=1)
    assert torch.equal(history, expected)  # the masked mean, in the model's own order of operations


@pytest.mark.parametrize("exit_layer", [1, 2, NUM_LAYERS])
def test_exit_layer_runs_only_the_blocks_before_it(exit_layer):
    model = early_exit().eval()
    called = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: called.append(i))
    for i, adapter in enumerate(model.adapters):
        adapter.register_forward_hook(lambda module, args, out, i=i: called.append(f"a{i}"))
    inputs = batch()
    with torch.no_grad():
        full = model(**inputs)
        called.clear()
        model.exit_layer = exit_layer
        truncated = model(**inputs)
    assert sorted(i for i in called if isinstance(i, int)) == list(range(exit_layer))
    assert sorted(i for i in called if isinstance(i, str)) == [f"a{i}" for i in range(exit_layer)]
    assert len(truncated.exit_logits) == exit_layer
    assert torch.equal(truncated.logits, truncated.exit_logits[-1])
    # Anytime: an exit's prediction does not depend on how many blocks run after it.
    for ours, full_depth in zip(truncated.exit_logits, full.exit_logits[:exit_layer], strict=True):
        assert torch.equal(ours, full_depth)  # the same operations on the same inputs
    # Evaluating (not training), the loss is the exits' plain cross-entropy on their own logits.
    model.ensemble = False
    with torch.no_grad():
        own = model(**inputs)
    expected = torch.stack(
        [torch.nn.functional.cross_entropy(logits, inputs["labels"]) for logits in own.exit_logits]
    ).mean()
    torch.testing.assert_close(truncated.loss, expected)


@pytest.mark.parametrize("bad", [0, -1, NUM_LAYERS + 1, 2.0, True, None])
def test_exit_layer_out_of_range_is_refused(bad):
    model = early_exit()
    with pytest.raises(ValueError, match="exit_layer must be an int from 1 to 4"):
        model.exit_layer = bad
    assert model.exit_layer == NUM_LAYERS


def test_training_a_shallow_client_moves_only_its_own_adapters_and_lowers_the_loss():
    exit_layer = 2
    model = early_exit()
    model.exit_layer = exit_layer
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    inputs = batch(seed=3)
    model.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(25):
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for name, param in model.named_parameters():
            if param.requires_grad and block_of(name) >= exit_layer:
                assert param.grad is None, name
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7, losses
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = set(trainable_state(model))
    assert changed <= trainable
    assert {block_of(name) for name in changed} == set(range(exit_layer))
    shallow = {name for name in trainable if block_of(name) < exit_layer}
    assert len(changed) >= 0.9 * len(shallow), sorted(shallow - changed)


def test_training_lowers_every_exits_loss():
    model = early_exit()
    model.ensemble = False  # each exit's own logits, not the running ensemble it answers with
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    inputs = batch(seed=4)
    labels = inputs["labels"].view(-1)

    def exit_losses() -> list[float]:
        with torch.no_grad():
            model.eval()
            output = model(**{key: value for key, value in inputs.items() if key != "labels"})
        return [F.cross_entropy(logits, labels).item() for logits in output.exit_logits]

    before = exit_losses()
    torch.manual_seed(0)
    model.train()
    for _ in range(25):
        model(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = exit_losses()
    assert all(late < 0.7 * early for early, late in zip(before, after, strict=True)), (before, after)


def test_padding_does_not_change_the_unpadded_examples_logits():
    model = early_exit().eval()
    exact = copy.deepcopy(model).double()
    inputs = batch()
    lengths = inputs["attention_mask"].sum(dim=1)
    with torch.no_grad():
        padded = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).exit_logits
        padded64 = exact(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).exit_logits
        for row in range(2):  # the padded rows, each alone at its own length
            ids = inputs["input_ids"][row : row + 1, : lengths[row]]
            alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).exit_logits
            # Another batch shape sums in another order: as accurate as the batch, not bit for bit.
            for batched, batched64, single in zip(padded, padded64, alone, strict=True):
                assert_as_accurate(
                    single, batched[row : row + 1], batched64[row : row + 1], f"row {row}", terms=HIDDEN
                )
        # Whatever sits at padded positions is ignored: masked attention weights are exactly 0.
        noisy = inputs["input_ids"].clone()
        noisy[inputs["attention_mask"] == 0] = 42
        changed = model(input_ids=noisy, attention_mask=inputs["attention_mask"]).exit_logits
    for ours, theirs in zip(changed, padded, strict=True):
        assert torch.equal(ours, theirs)


def test_token_type_ids_and_other_batch_keys_are_accepted():
    model = early_exit().eval()
    inputs = batch()
    with torch.no_grad():
        plain = model(**inputs)
        extra = model(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]), position_hint=None)
    assert torch.equal(extra.logits, plain.logits)  # token type 0 is BERT's default: the same inputs


def test_save_then_load_reproduces_the_trained_model(tmp_path):
    base_dir = tmp_path / "base"
    torch.manual_seed(7)
    BertModel(tiny_config()).save_pretrained(base_dir)
    method = METHODS.create("ee-adapter")
    from edgefed.models import load_classifier

    model = method.adapt(load_classifier(str(base_dir), NUM_LABELS)[0], SPEC, {})
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    method.save(model, SPEC, {}, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert saved == {
        "method": "ee-adapter",
        "rank": 4,
        "attention_width": 8,
        "attention_heads": 2,
        "ffn_width": 32,
        "num_layers": NUM_LAYERS,
        "num_labels": NUM_LABELS,
    }
    # The saved widths win over the spec's rank.
    base, _ = load_classifier(str(base_dir), NUM_LABELS)
    loaded = method.load(tmp_path / "adapter", base, AdapterSpec(rank=16))
    inputs = batch()
    model.eval()
    loaded.eval()
    with torch.no_grad():
        expected, actual = model(**inputs), loaded(**inputs)
    for ours, theirs in zip(actual.exit_logits, expected.exit_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=0, rtol=0)


def test_method_registration_and_defaults():
    method = METHODS.create("ee-adapter")
    assert method.default_lr == 2e-3 and method.own_head_prefix == "exits"
    assert not method.adapters_see_all_tokens  # the cost model counts first-token states only
    assert method.low_rank_pairs(early_exit()) == []


def test_the_exits_loss_options_weigh_what_they_say():
    generator = torch.Generator().manual_seed(5)
    exit_logits = [torch.randn(8, NUM_LABELS, generator=generator) for _ in range(3)]
    labels = torch.randint(0, NUM_LABELS, (8,), generator=generator)
    each = [F.cross_entropy(logits, labels) for logits in exit_logits]
    torch.testing.assert_close(exits_loss(exit_logits, labels, 0.0), torch.stack(each).mean())
    # Balanced softmax: each exit's logits shifted by the log of the batch's (add-one) label frequencies.
    counts = torch.tensor([(labels == k).sum().item() + 1.0 for k in range(NUM_LABELS)])
    prior = (counts / counts.sum()).log()
    balanced = torch.stack([F.cross_entropy(logits + prior, labels) for logits in exit_logits]).mean()
    torch.testing.assert_close(exits_loss(exit_logits, labels, 0.0, balanced=True), balanced)
    deep = exits_loss(exit_logits, labels, 0.0, depth_weighted=True)
    torch.testing.assert_close(deep, (each[0] + 2 * each[1] + 3 * each[2]) / 6)
    # Self-distillation adds a KL term that is zero only when every exit agrees with the teacher.
    assert exits_loss(exit_logits, labels, 1.0) > exits_loss(exit_logits, labels, 0.0)
    same = [exit_logits[0]] * 3
    torch.testing.assert_close(exits_loss(same, labels, 1.0), exits_loss(same, labels, 0.0))


def test_each_exit_answers_with_the_running_mean_of_the_exits_log_probabilities():
    model = early_exit().eval()
    inputs = batch(seed=6)
    with torch.no_grad():
        for param in model.exits.parameters():  # the heads start near zero: make the exits disagree
            param.add_(0.5 * torch.randn_like(param))
        model.ensemble = False
        own = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).exit_logits
        model.ensemble = True
        answers = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).exit_logits
    log_probabilities = [F.log_softmax(logits, dim=-1) for logits in own]
    for i, answer in enumerate(answers):
        torch.testing.assert_close(answer, torch.stack(log_probabilities[: i + 1]).mean(0))
