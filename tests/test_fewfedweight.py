"""Few-shot multi-task runs and FewFedWeight: the clients' data, the label-scoring model, pseudo labels
with energy weights, performance-adaptive aggregation, and runs as every method runs (gRPC, codecs,
resume, load_trained), with one clear error for each kind of bad input."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch

from edgefed.aggregators.adaptive import TEMPERATURE, score_weights
from edgefed.cli import main
from edgefed.components import data_settings, resolve_config
from edgefed.data.fewshot import draw_shards, held_out_rows, load_task, read_shard
from edgefed.errors import EdgefedError
from edgefed.families import LabelScorer
from edgefed.families.label_scorer import SCALE
from edgefed.federation.checkpoint import load_checkpoint
from edgefed.models import load_tokenizer
from edgefed.setup import load_trained, prepare
from edgefed.tasks import TASKS
from edgefed.tasks.pseudo import PseudoLabels, energy, energy_weights
from edgefed.types import ClientUpdate
from tests.test_cli import assert_one_clear_line
from tests.test_run import tiny_argv
from tests.test_transport import EXACT_KEYS, assert_same_run, final_state, rows_of
from tests.tiny import tiny_bert_config
from tests.tolerance import (
    assert_as_accurate_in_norm,
    assert_runs_agree,
    assert_within,
    gamma,
    training_terms,
)

TASK_NAMES = ("mr", "subj", "trec")


FEWSHOT = {"method": "federa", "shots": 6, "holdout_shots": 2, "unlabeled_pool": 16}
# tiny_run's 3 rounds of 3 local steps, each a labelled and a pseudo-labelled batch (an aggregation
# counted as one more), on the tiny BERT at 24 tokens; then an evaluation over 3 × 40 test rows.
FEWSHOT_TERMS = training_terms(tiny_bert_config(), seq_len=24, batch_size=8, steps=3 * 7, eval_examples=120)


def fewshot_argv(tiny_model_dir, fewshot_dir, out, **changes) -> list[str]:
    """`tiny_run`'s command line on the three small tasks (a change to None drops its flag)."""
    tasks = ",".join(str(fewshot_dir / task) for task in TASK_NAMES)
    return tiny_argv(out, tiny_model_dir, None, **{"tasks": tasks, **FEWSHOT, **changes})


@pytest.fixture(scope="module")
def fewfedweight_run(tmp_path_factory, tiny_model_dir, fewshot_dir):
    out = tmp_path_factory.mktemp("runs") / "fewfedweight"
    assert main(fewshot_argv(tiny_model_dir, fewshot_dir, out, preset="fewfedweight")) == 0
    return out


# -- the data ----------------------------------------------------------------------------------------


def test_each_client_holds_k_shots_per_class_of_its_task_and_a_disjoint_pool(fewshot_dir):
    tasks = [load_task(fewshot_dir / name) for name in TASK_NAMES]
    shards = draw_shards(tasks, clients=4, shots=6, holdout=2, pool=16, seed=0)
    assert [shard.task for shard in shards] == ["mr", "subj", "trec", "mr"]  # client k: task k mod T
    for shard, task in zip(shards, [*tasks, tasks[0]], strict=True):
        counts = [shard.labeled.labels.count(label) for label in range(len(task.label_names))]
        assert counts == [6] * len(task.label_names)
        assert len(shard.unlabeled) == 16 and not set(shard.unlabeled) & set(shard.labeled.texts)
    assert shards[3].labeled.texts != shards[0].labeled.texts  # a second mr client draws its own shots
    again = draw_shards(tasks, clients=4, shots=6, holdout=2, pool=16, seed=0)
    assert [s.labeled.texts for s in again] == [s.labeled.texts for s in shards]
    other_seed = draw_shards(tasks, clients=4, shots=6, holdout=2, pool=16, seed=1)
    assert other_seed[0].labeled.texts != shards[0].labeled.texts


def test_a_one_task_run_draws_what_the_multi_task_client_holds(fewshot_dir):
    """So local-only training (one run per task) trains exactly the multi-task clients' shots."""
    tasks = [load_task(fewshot_dir / name) for name in TASK_NAMES]
    together = draw_shards(tasks, clients=3, shots=6, holdout=2, pool=16, seed=3)
    alone = draw_shards([tasks[2]], clients=1, shots=6, holdout=2, pool=16, seed=3)
    assert alone[0].labeled == together[2].labeled and alone[0].unlabeled == together[2].unlabeled


def test_a_shard_round_trips_through_its_folder_and_holds_out_each_class_tail(fewshot_dir, tmp_path):
    shard = draw_shards([load_task(fewshot_dir / "trec")], 1, shots=6, holdout=2, pool=16, seed=0)[0]
    read = read_shard(shard.write(tmp_path / "client"))
    assert (read.label_names, read.labeled.texts, read.labeled.labels, read.unlabeled) == (
        shard.label_names, shard.labeled.texts, shard.labeled.labels, shard.unlabeled,
    )  # fmt: skip
    held = held_out_rows(read.labeled.labels, 2)
    assert len(held) == 2 * 6 and all(read.labeled.labels[row] == row // 6 for row in held)
    assert [row % 6 for row in held] == [4, 5] * 6  # the last two of each class


# -- the model, the pseudo labels, the aggregation ------------------------------------------------------


def test_the_label_scorer_scores_inputs_against_label_names_and_weighs_losses(minilm_path):
    torch.manual_seed(0)
    from transformers import BertModel

    model = LabelScorer(BertModel(tiny_bert_config(), add_pooling_layer=False)).eval()
    tokenizer = load_tokenizer(minilm_path)
    texts = tokenizer(["a fine film", "what is a cat ?"], padding=True, return_tensors="pt")
    names = tokenizer(["negative", "positive", "neutral"], padding=True, return_tensors="pt")
    batch = {
        "input_ids": texts["input_ids"],
        "attention_mask": texts["attention_mask"],
        "label_input_ids": names["input_ids"],
        "label_attention_mask": names["attention_mask"],
    }
    labels = torch.tensor([1, 2])
    output = model(**batch, labels=labels)
    inputs = model.embed(texts["input_ids"], texts["attention_mask"])
    label_vectors = model.embed(names["input_ids"], names["attention_mask"])
    expected = SCALE * torch.nn.functional.cosine_similarity(inputs[:, None], label_vectors[None], dim=-1)
    # Two float32 routes to SCALE·cos: each within γ_{2d+4} of it (|x|ᵀ|y| ≤ ‖x‖‖y‖ bounds the terms).
    logit_bound = 2 * SCALE * gamma(2 * model.config.hidden_size + 4)
    assert_within(output.logits, expected, logit_bound, "logits")
    losses = torch.nn.functional.cross_entropy(expected, labels, reduction="none")
    weighted = model(**batch, labels=labels, example_weights=torch.tensor([0.5, 1.5])).loss
    # Cross-entropy moves by at most twice its logits' largest change; the weighted mean adds γ₄.
    formula = (0.5 * losses[0] + 1.5 * losses[1]) / 2
    assert_within(weighted, formula, 2 * logit_bound + gamma(4) * (0.5 * losses[0] + 1.5 * losses[1]), "loss")


def test_energy_weights_average_one_and_favour_low_energy():
    logits = torch.tensor([[4.0, 0.0], [0.5, 0.4], [2.0, 1.0], [0.0, 0.1]])
    values = energy(logits, 2.0)
    assert torch.equal(values, -2.0 * torch.logsumexp(logits / 2.0, dim=-1))
    weights = energy_weights(logits, 2.0)
    # n·softmax sums to n up to the softmax's normalisation and the mean's sum: γ_{2n+2}.
    assert weights.mean().item() == pytest.approx(1.0, abs=gamma(2 * len(weights) + 2))
    assert torch.equal(torch.argsort(weights), torch.argsort(-values))  # lower energy, larger weight
    standardised = (values - values.mean()) / values.std()
    assert torch.equal(weights, 4 * torch.softmax(-standardised, dim=0))  # the same operations


def test_pseudo_labels_are_the_global_models_answers_and_leave_it_unchanged(tiny_model_dir, fewshot_dir):
    tasks = [str(fewshot_dir / task) for task in TASK_NAMES]
    config = resolve_config(
        None, {"model": str(tiny_model_dir), "tasks": tasks, "clients": 3, "rank": 4, **FEWSHOT}
    )
    side = prepare(config)
    shard = side.task.shards(side.train, data_settings(config))[2]
    examples = side.task.encode_client(shard, side.tokenizer, 24, data_settings(config))
    before = {name: p.detach().clone() for name, p in side.global_model.named_parameters()}
    for weighting in ("uniform", "energy"):
        labeled = PseudoLabels(examples.unlabeled, weighting, 1.0, 1.0).label(side.global_model, side.device)
        batch = examples.unlabeled.batch(list(range(len(examples.unlabeled))))
        batch.pop("labels")
        logits = side.global_model(**batch).logits
        assert labeled.labels == logits.argmax(dim=-1).tolist()
        if weighting == "uniform":
            assert labeled.weights == [1.0] * len(logits)
            continue
        # label() batches the pool by length, so its logits round differently; standardising divides
        # by the energies' spread, which magnifies that. As accurate as these weights, in float64's eyes.
        exact = copy.deepcopy(side.global_model).double()(**batch).logits
        assert_as_accurate_in_norm(
            labeled.weights, energy_weights(logits, 1.0), energy_weights(exact, 1.0), "weights", terms=32
        )
    for name, param in side.global_model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_adaptive_weights_are_a_softmax_of_held_out_scores():
    updates = [
        ClientUpdate(k, {}, 10 * (k + 1), 0.5, 1, 0.0, score) for k, score in enumerate([0.5, 0.75, 1.0])
    ]
    exps = [math.exp(score / TEMPERATURE) for score in (0.5, 0.75, 1.0)]
    assert score_weights(updates) == pytest.approx([value / sum(exps) for value in exps])
    with pytest.raises(EdgefedError, match=r"clients \[1\] reported none"):
        score_weights([updates[0], ClientUpdate(1, {}, 10, 0.5, 1, 0.0)])


# -- runs ----------------------------------------------------------------------------------------------


def test_a_fewfedweight_run_records_every_task_and_each_clients_score(fewfedweight_run):
    rows = rows_of(fewfedweight_run)
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    for row in rows:
        assert set(row["task_accuracy"]) == set(TASK_NAMES)
        assert row["accuracy"] == pytest.approx(sum(row["task_accuracy"].values()) / 3)
    assert rows[0].get("client_scores") is None
    assert all(
        len(row["client_scores"]) == 3 and all(0 <= s <= 1 for s in row["client_scores"]) for row in rows[1:]
    )
    config = (fewfedweight_run / "config.toml").read_text()
    assert 'pseudo-labels = "energy"' in config and 'aggregator = "adaptive"' in config
    assert "its inputs never leave it" in config


def test_pseudo_labels_and_adaptive_weights_each_change_the_run(
    fewfedweight_run, tmp_path, tiny_model_dir, fewshot_dir
):
    """Golden: FewFedWeight, and it with each part switched off, train different models."""
    finals = {"fewfedweight": rows_of(fewfedweight_run)[-1]["loss"]}
    for name, changes in {
        "no-energy": {"pseudo_labels": "uniform", "aggregator": "adaptive"},
        "count-weights": {"pseudo_labels": "energy", "aggregator": "fedavg"},
        "fedavg": {},
    }.items():
        assert main(fewshot_argv(tiny_model_dir, fewshot_dir, tmp_path / name, **changes)) == 0
        finals[name] = rows_of(tmp_path / name)[-1]["loss"]
    assert len(set(finals.values())) == 4, finals


def test_load_trained_reproduces_the_final_evaluation(fewfedweight_run):
    model = load_trained(fewfedweight_run)
    config = resolve_config(str(fewfedweight_run / "config.toml"), {})
    side = prepare(config)
    evaluation = side.task.evaluate(model, side.eval_examples, side.device)
    assert evaluation.task_accuracy == rows_of(fewfedweight_run)[-1]["task_accuracy"]


def test_a_grpc_run_computes_the_in_process_run(fewfedweight_run, tmp_path, tiny_model_dir, fewshot_dir):
    """The same clients, bytes, scores and per-task accuracy; the final adapters agree up to float
    summation order (client processes train on one thread), which Adam's normalisation magnifies
    where a gradient is near zero."""
    out = tmp_path / "grpc"
    assert main(fewshot_argv(tiny_model_dir, fewshot_dir, out, preset="fewfedweight", transport="grpc")) == 0
    for row_a, row_b in zip(rows_of(fewfedweight_run), rows_of(out), strict=True):
        for key in (*EXACT_KEYS, "task_accuracy", "client_scores"):
            assert row_a.get(key) == row_b.get(key), key
        assert_runs_agree(row_a["loss"], row_b["loss"], FEWSHOT_TERMS, f"round {row_a['round']} loss")
    assert_runs_agree(final_state(fewfedweight_run), final_state(out), FEWSHOT_TERMS, "final state")


def test_a_killed_run_resumes_to_the_uninterrupted_result(
    fewfedweight_run, tmp_path, tiny_model_dir, fewshot_dir, crash_after_round, monkeypatch
):
    out = tmp_path / "resumed"
    crash_after_round(2)
    assert main(fewshot_argv(tiny_model_dir, fewshot_dir, out, preset="fewfedweight")) == 130
    assert load_checkpoint(out).round == 2
    monkeypatch.undo()
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert_same_run(fewfedweight_run, out, setup_resent_in=3)  # the restarted clients fetch the setup again


def test_quantised_updates_carry_the_scores(tmp_path, tiny_model_dir, fewshot_dir):
    out = tmp_path / "int8"
    flags = {"preset": "fewfedweight", "codec": "int8", "rounds": 2}
    assert main(fewshot_argv(tiny_model_dir, fewshot_dir, out, **flags)) == 0
    rows = rows_of(out)
    assert rows[-1]["bytes_up"] < rows[-1]["bytes_down"] and len(rows[-1]["client_scores"]) == 3


def test_a_task_no_client_trains_on_is_evaluated_with_the_same_model(tmp_path, tiny_model_dir, fewshot_dir):
    out = tmp_path / "unseen"
    flags = {"tasks": f"{fewshot_dir / 'mr'},{fewshot_dir / 'trec'}", "eval_tasks": fewshot_dir / "subj"}
    assert main(fewshot_argv(tiny_model_dir, fewshot_dir, out, clients=2, rounds=1, **flags)) == 0
    row = rows_of(out)[-1]
    assert set(row["task_accuracy"]) == {"mr", "trec", "subj"}
    assert row["accuracy"] == pytest.approx((row["task_accuracy"]["mr"] + row["task_accuracy"]["trec"]) / 2)


# -- bad input: one clear line, nothing written ----------------------------------------------------------


def broken_task(fewshot_dir, tmp_path, change):
    folder = tmp_path / "broken"
    shutil.copytree(fewshot_dir / "mr", folder)
    change(folder)
    return folder


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no labels.txt", "no labels.txt"),
        ("label outside labels.txt", "has label 2, outside labels.txt's 2 names"),
        ("shots above a class", "has 30 training examples, fewer than shots 40"),
        ("adaptive without tasks", "aggregator adaptive needs a few-shot multi-task run"),
        ("full fine-tuning", "fft cannot (use lora or federa)"),
    ],
)
def test_bad_multi_task_input(case, expected, tmp_path, tiny_model_dir, fewshot_dir, capfd):
    flags = {}
    if case == "no labels.txt":
        flags["tasks"] = broken_task(fewshot_dir, tmp_path, lambda f: (f / "labels.txt").unlink())
    elif case == "label outside labels.txt":
        flags["tasks"] = broken_task(
            fewshot_dir, tmp_path, lambda f: f.joinpath("test.tsv").open("a").write("odd\t2\n")
        )
    elif case == "shots above a class":
        flags["shots"] = 40
    elif case == "adaptive without tasks":
        flags.update(tasks=None, aggregator="adaptive")
    else:
        flags["method"] = "fft"
    capfd.readouterr()
    code = main(fewshot_argv(tiny_model_dir, fewshot_dir, tmp_path / "run", **flags))
    assert_one_clear_line(
        type("Result", (), {"returncode": code, "stderr": capfd.readouterr().err})(), expected
    )
    assert not (tmp_path / "run").exists()


def test_a_client_without_an_unlabelled_pool_is_refused(fewshot_dir, tmp_path):
    shard = draw_shards([load_task(fewshot_dir / "mr")], 1, shots=6, holdout=2, pool=16, seed=0)[0]
    folder = shard.write(tmp_path / "client")
    (folder / "unlabeled.txt").unlink()
    with pytest.raises(EdgefedError, match=r"no unlabeled\.txt: the client has no unlabelled pool"):
        TASKS.create("multitask").client_data(str(folder))
    (folder / "unlabeled.txt").write_text("\n")
    with pytest.raises(EdgefedError, match="holds no text"):
        read_shard(folder)
