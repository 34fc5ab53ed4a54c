"""Pre-training on a tiny BERT: masked-LM text and masking, FDAPT and FFDAPT, and FedBERT's split
learning (split = unsplit, both strategies, gRPC = in-process, what crosses the wire, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, BertModel

from edgefed.cli import main
from edgefed.codecs import make_codec
from edgefed.config import RunConfig
from edgefed.data import EncodedExamples
from edgefed.data.files import read_text_file
from edgefed.data.masking import IGNORED, MLM_PROBABILITY, encode_for_mlm
from edgefed.errors import EdgefedError
from edgefed.federation.checkpoint import load_checkpoint
from edgefed.models import load_tokenizer
from edgefed.split import BodyTrainer, SplitBodyServicer, split_channel
from edgefed.split.servicer import StreamState
from edgefed.tasks import TASKS, DataSettings
from edgefed.transport import servicer as federation_servicer
from edgefed.transport.auth import TokenBook, bearer_metadata
from edgefed.transport.grpc_server import GrpcTransport
from edgefed.transport.servicer import FederationServicer, RunDescription
from edgefed.types import TIMING_FIELDS as TIMING_KEYS
from edgefed.wire.framing import WireError, tensor_message
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc
from tests.tiny import tiny_bert_config
from tests.tolerance import assert_runs_agree, training_terms

# What a client's Split message may carry: no token ids, no labels.
SPLIT_FIELDS = {"run_id", "round", "client_id", "step", "kind", "tensor", "attention_mask"}


@pytest.fixture(scope="module")
def reviews_dir(tmp_path_factory, small_data_dir) -> Path:
    """SST-2's sentences as a movie-review corpus: train.txt and dev.txt, one document per line."""
    folder = tmp_path_factory.mktemp("reviews")
    for source, target, rows in (("train.tsv", "train.txt", 240), ("dev.tsv", "dev.txt", 48)):
        lines = (small_data_dir / source).read_text(encoding="utf-8").splitlines()[1 : rows + 1]
        (folder / target).write_text(
            "\n".join(line.split("\t")[0] for line in lines) + "\n", encoding="utf-8"
        )
    return folder


def pretrain(out: Path, model: Path, data: Path, **overrides) -> Path:
    """`edgefed run` of a pre-training method on the tiny model; keyword arguments override flags."""
    flags = {
        "method": "fdapt",
        "model": model,
        "data": data,
        "clients": 2,
        "rounds": 2,
        "local_steps": 3,
        "batch_size": 8,
        "max_seq_len": 24,
        "partition": "iid",
        "lr": 1e-2,
        "out": out,
        **overrides,
    }
    argv = ["run"]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    return out


def rows_of(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in TIMING_KEYS} for row in rows]


def saved_model(run_dir: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForMaskedLM.from_pretrained(run_dir / "model", local_files_only=True)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


# pretrain's chain of roundings: 2 rounds of 3 local steps (an aggregation counted as a fourth) on the
# tiny BERT at 24 tokens and batches of 8, a softmax over its vocabulary, then an evaluation over the
# 48 dev documents.
PRETRAIN_TERMS = training_terms(
    tiny_bert_config(),
    seq_len=24,
    batch_size=8,
    steps=2 * 4,
    eval_examples=48,
    outputs=tiny_bert_config().vocab_size,
)


def assert_same_curves(a: Path, b: Path) -> None:
    for row_a, row_b in zip(rows_of(a), rows_of(b), strict=True):
        assert row_a["accuracy"] == row_b["accuracy"]  # a count of right predictions, not a float
        for key in ("loss", "mlm_loss", "train_loss"):
            assert (row_a[key] is None) == (row_b[key] is None), key
            if row_a[key] is not None:  # equal in one process; rounding may differ in another
                assert_runs_agree(row_a[key], row_b[key], PRETRAIN_TERMS, f"round {row_a['round']} {key}")


def assert_same_model(a: Path, b: Path) -> None:
    expected, got = saved_model(a), saved_model(b)
    assert expected.keys() == got.keys()
    # Softmax ignores a shift shared by every key, so the key biases' gradient is 0 up to rounding, and
    # AdamW turns rounding noise into steps of ±lr: two runs that round differently differ there.
    compared = [name for name in expected if not name.endswith("attention.self.key.bias")]
    assert_runs_agree(
        {name: got[name] for name in compared},
        {name: expected[name] for name in compared},
        PRETRAIN_TERMS,
        "model",
    )


# -- text and masking ------------------------------------------------------------------------------


def test_text_files_hold_one_document_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("a fine film\n\n  slow and dull  \n", encoding="utf-8")
    assert read_text_file(path).texts == ["a fine film", "slow and dull"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 society\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("text\n", encoding="utf-8")
    for name, error in (
        ("latin1.txt", "not UTF-8"),
        ("blank.txt", "holds no text"),
        ("notes.md", "unsupported"),
    ):
        with pytest.raises(EdgefedError, match=error):
            read_text_file(tmp_path / name)


def test_masking_is_bert_s_and_reproducible(reviews_dir, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = encode_for_mlm(read_text_file(reviews_dir / "train.txt"), tokenizer, 24)
    indices = list(range(200))
    batch = examples.batch(indices, torch.Generator().manual_seed(3))
    padded = EncodedExamples.batch(examples, indices)  # the same batch, unmasked
    ids, labels, inputs = padded["input_ids"], batch["labels"], batch["input_ids"]
    maskable = padded["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    scored = labels != IGNORED
    assert not (scored & ~maskable).any(), "special tokens and padding are never masked"
    assert torch.equal(labels[scored], ids[scored])
    assert (scored.sum(dim=1) >= 1).all(), "every sequence has a masked token"
    share = scored.sum().item() / maskable.sum().item()
    assert MLM_PROBABILITY - 0.03 < share < MLM_PROBABILITY + 0.06  # + the one forced per short phrase
    replaced = (inputs[scored] == tokenizer.mask_token_id).float().mean().item()
    assert 0.7 < replaced < 0.9
    assert torch.equal(inputs[~scored], ids[~scored])
    again = examples.batch(indices, torch.Generator().manual_seed(3))
    assert all(torch.equal(batch[key], again[key]) for key in batch)
    other = examples.batch(indices, torch.Generator().manual_seed(4))
    assert not torch.equal(batch["labels"], other["labels"])
    fixed = [examples.batch(indices[:16])["labels"] for _ in range(2)]  # evaluation: the same each time
    assert torch.equal(*fixed)


# -- FDAPT and FFDAPT ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fdapt_run(tmp_path_factory, tiny_model_dir, reviews_dir) -> Path:
    return pretrain(tmp_path_factory.mktemp("runs") / "fdapt", tiny_model_dir, reviews_dir)


def test_fdapt_records_mlm_loss_and_saves_a_model_that_fine_tunes(
    fdapt_run, tiny_model_dir, reviews_dir, small_data_dir, tmp_path
):
    rows = rows_of(fdapt_run)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["mlm_loss"] == row["loss"] for row in rows)
    assert rows[2]["mlm_loss"] < rows[1]["mlm_loss"] < rows[0]["mlm_loss"]
    # The saved model is the global model: evaluated afresh it gives the last round's MLM loss.
    task = TASKS.create("masked-lm")
    model = AutoModelForMaskedLM.from_pretrained(fdapt_run / "model", local_files_only=True)
    tokenizer = load_tokenizer(str(fdapt_run / "model"))
    _, dev = task.load_data(DataSettings(str(reviews_dir), seed=0, clients=2, partition="iid"))
    evaluation = task.evaluate(model, task.encode(dev, tokenizer, 24), torch.device("cpu"))
    assert evaluation.mlm_loss == rows[-1]["mlm_loss"]  # the same model, data and order of operations
    summary = json.loads((fdapt_run / "summary.json").read_text())
    assert summary["task"] == "masked-lm" and summary["final_mlm_loss"] == rows[-1]["mlm_loss"]
    # ... and is the --model of a fine-tuning run, as it stands, with the checkpoint's pooler kept:
    # the fine-tuning run trains a new classifier only.
    saved = load_file(fdapt_run / "model" / "model.safetensors")
    pooler = BertModel.from_pretrained(tiny_model_dir).pooler.dense.weight
    assert torch.equal(saved["bert.pooler.dense.weight"], pooler)
    argv = ["run", "--model", str(fdapt_run / "model"), "--data", str(small_data_dir), "--out"]
    assert main([*argv, str(tmp_path / "fine-tuned"), "--rounds", "1", "--local-steps", "2"]) == 0
    assert rows_of(tmp_path / "fine-tuned")[-1]["accuracy"] > 0
    assert json.loads((tmp_path / "fine-tuned" / "summary.json").read_text())["head_modules"] == [
        "classifier"
    ]


@pytest.mark.parametrize(
    ("freeze", "frozen", "trained"),
    [
        ("embeddings,layers:0", ("bert.embeddings.", "bert.encoder.layer.0."), ("bert.encoder.layer.1.",)),
        ("layers:1", ("bert.encoder.layer.1.",), ("bert.embeddings.word", "bert.encoder.layer.0.")),
    ],
)
def test_ffdapt_never_changes_its_frozen_parameters(
    freeze, frozen, trained, fdapt_run, tiny_model_dir, reviews_dir, tmp_path
):
    out = pretrain(tmp_path / "ffdapt", tiny_model_dir, reviews_dir, method="ffdapt", freeze=freeze)
    before = {
        name: tensor
        for name, tensor in AutoModelForMaskedLM.from_pretrained(tiny_model_dir).state_dict().items()
        if name.startswith("bert.")  # the MLM head is new, drawn at random
    }
    after = saved_model(out)
    frozen_names = [name for name in before if name.startswith(frozen)]
    trained_names = [name for name in before if name.startswith(trained)]
    assert frozen_names and trained_names
    assert all(torch.equal(after[name], before[name]) for name in frozen_names)
    assert all(not torch.equal(after[name], before[name]) for name in trained_names)
    # Frozen tensors do not travel.
    assert rows_of(out)[1]["bytes_up"] < rows_of(fdapt_run)[1]["bytes_up"]


@pytest.mark.parametrize(
    ("freeze", "error"),
    [
        ("layers:2", "not a range of this model's layers"),
        ("layers:1-0", "not a range"),
        ("head", "expected embeddings, layers:<i>"),
        ("embeddings,layers:0-1", "only the MLM head"),
    ],
)
def test_a_bad_frozen_set_is_one_clear_error(freeze, error, tiny_model_dir, reviews_dir, tmp_path, capsys):
    argv = ["run", "--method", "ffdapt", "--model", str(tiny_model_dir), "--data", str(reviews_dir)]
    assert main([*argv, "--freeze", freeze, "--out", str(tmp_path / "run")]) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- FedBERT ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_free_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny BERT without dropout: the split body draws its dropout from a generator of its own."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    config = BertConfig.from_pretrained(
        tiny_model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    BertModel.from_pretrained(tiny_model_dir, config=config).save_pretrained(folder)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("strategy", ["sequential", "parallel"])
def test_split_training_matches_unsplit_training(strategy, dropout_free_model_dir, reviews_dir, tmp_path):
    """One client, exact wire, no clipping (split clips each side apart): FedBERT is FDAPT, cut in two."""
    same = {"clients": 1, "max_grad_norm": 0, "rounds": 2}
    model = dropout_free_model_dir
    unsplit = pretrain(tmp_path / "unsplit", model, reviews_dir, **same)
    split = pretrain(
        tmp_path / "split", model, reviews_dir, method="fedbert", split_codec="none", split_strategy=strategy,
        **same,
    )  # fmt: skip
    assert_same_curves(unsplit, split)
    assert_same_model(unsplit, split)
    assert "split_bytes_up" not in rows_of(unsplit)[1] and rows_of(split)[1]["split_bytes_up"] > 0


def make_trainer(strategy: str) -> BodyTrainer:
    torch.manual_seed(0)
    body = torch.nn.Linear(4, 4)
    return BodyTrainer(body, strategy, lr=0.1, max_grad_norm=None, device=torch.device("cpu"))


def test_the_parallel_body_is_the_weighted_mean_of_the_clients_copies():
    trainer = make_trainer("parallel")
    start = trainer.state_dict()
    trainer.begin_round(1, ["a", "b", "gone"])
    a, b, gone = (trainer.slot(name) for name in ("a", "b", "gone"))
    assert len({id(a.body), id(b.body), id(gone.body), id(trainer.body)}) == 4
    with torch.no_grad():
        a.body.weight.fill_(1.0)
        b.body.weight.fill_(5.0)
        gone.body.weight.fill_(100.0)  # a client whose update never arrived
    assert torch.equal(trainer.body.weight, start["weight"]), "no stream trains the round's starting body"
    trainer.end_round({"a": 3, "b": 1})
    assert torch.equal(trainer.body.weight, torch.full((4, 4), 2.0))  # (3·1 + 1·5) / 4
    trainer.begin_round(2, ["a"])
    with pytest.raises(WireError, match="'b' does not train in round 2"):
        trainer.slot("b")


def test_sequential_clients_share_one_body_and_a_rerun_round_restarts_it():
    trainer = make_trainer("sequential")
    start = trainer.state_dict()
    trainer.begin_round(1, ["a", "b"])
    assert trainer.slot("a") is trainer.slot("b") and trainer.slot("a").body is trainer.body
    with torch.no_grad():
        trainer.body.weight.add_(1.0)
    trainer.begin_round(1, ["a", "b"])  # too few updates arrived: round 1 again
    assert torch.equal(trainer.body.weight, start["weight"])


@pytest.fixture(scope="module")
def inproc_fedbert(tmp_path_factory, tiny_model_dir, reviews_dir):
    made: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in made:
            out = tmp_path_factory.mktemp("fedbert") / strategy
            made[strategy] = pretrain(
                out, tiny_model_dir, reviews_dir, method="fedbert", split_strategy=strategy
            )
        return made[strategy]

    return get


@pytest.fixture(scope="module")
def grpc_fedbert(tmp_path_factory, tiny_model_dir, reviews_dir):
    """FedBERT over gRPC per strategy: the run, the Split messages the server answered and the names of
    the tensors each update pushed."""
    made: dict[str, tuple[Path, list[pb.SplitMessage], list[set[str]]]] = {}

    def get(strategy: str) -> tuple[Path, list[pb.SplitMessage], list[set[str]]]:
        if strategy in made:
            return made[strategy]
        split_messages: list[pb.SplitMessage] = []
        pushed: list[set[str]] = []
        answer, receive = SplitBodyServicer._answer, federation_servicer.receive_update

        def recording_answer(self, message, stream, context):
            split_messages.append(pb.SplitMessage.FromString(message.SerializeToString()))
            return answer(self, message, stream, context)

        def recording_receive(*args, **kwargs):
            update = receive(*args, **kwargs)
            pushed.append(set(update.delta))
            return update

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SplitBodyServicer, "_answer", recording_answer)
            patch.setattr(federation_servicer, "receive_update", recording_receive)
            out = pretrain(
                tmp_path_factory.mktemp("fedbert-grpc") / strategy, tiny_model_dir, reviews_dir,
                method="fedbert", split_strategy=strategy, transport="grpc",
            )  # fmt: skip
        made[strategy] = (out, split_messages, pushed)
        return made[strategy]

    return get


@pytest.mark.parametrize("strategy", ["sequential", "parallel"])
def test_fedbert_over_grpc_computes_the_in_process_run_and_never_sends_tokens_or_labels(
    strategy, inproc_fedbert, grpc_fedbert
):
    expected = inproc_fedbert(strategy)
    out, split_messages, pushed = grpc_fedbert(strategy)
    exact = ("round", "clients", "bytes_up", "bytes_down", "split_bytes_up", "split_bytes_down")
    assert [{k: row.get(k) for k in exact} for row in rows_of(out)] == [
        {k: row.get(k) for k in exact} for row in rows_of(expected)
    ]
    assert_same_curves(expected, out)
    # What reached the server: float activations and gradients [batch, length, hidden] and 0/1 masks
    # from the Split streams, and the client part's tensors from the federation; never ids or labels.
    assert len(split_messages) == 2 * 2 * 2 * 3  # rounds × clients × steps × (forward, backward)
    for message in split_messages:
        assert {descriptor.name for descriptor, _ in message.ListFields()} <= SPLIT_FIELDS
        assert message.kind in (pb.SplitMessage.ACTIVATIONS, pb.SplitMessage.OUTPUT_GRADIENT)
        assert message.tensor.dtype in ("float32", "float16") and message.tensor.shape[-1] == 32
        assert len(message.tensor.shape) == 3
        if message.HasField("attention_mask"):
            assert message.attention_mask.dtype == "uint8"
            assert set(message.attention_mask.data) <= {0, 1}
    assert len(pushed) == 4
    assert all(name.startswith(("bert.embeddings.", "cls.")) for names in pushed for name in names)


@pytest.mark.parametrize("transport", ["inproc", "grpc"])
def test_a_crashed_fedbert_run_resumes_with_its_body(
    transport,
    inproc_fedbert,
    grpc_fedbert,
    tiny_model_dir,
    reviews_dir,
    tmp_path,
    monkeypatch,
    crash_after_round,
):
    crash_after_round(1)
    out = tmp_path / "resumed"
    argv = ["run", "--method", "fedbert", "--model", str(tiny_model_dir), "--data", str(reviews_dir)]
    flags = ["--clients", "2", "--rounds", "2", "--local-steps", "3", "--batch-size", "8"]
    flags += ["--max-seq-len", "24", "--partition", "iid", "--lr", "0.01", "--out", str(out)]
    flags += ["--transport", transport]
    assert main([*argv, *flags]) == 130
    assert load_checkpoint(out).server_state, "the body is in the checkpoint"
    monkeypatch.undo()
    assert main(["run", "--out", str(out), "--resume"]) == 0
    # The uninterrupted run on the same transport. (Across transports the runs agree up to rounding,
    # which AdamW may turn into steps of ±lr: the client processes train on one thread each.)
    uninterrupted = inproc_fedbert("sequential") if transport == "inproc" else grpc_fedbert("sequential")[0]
    assert_same_curves(uninterrupted, out)
    assert_same_model(uninterrupted, out)


def test_the_split_servicer_asks_the_round_which_body_a_client_trains():
    trainer = make_trainer("sequential")
    trainer.begin_round(3, ["client-0"])
    servicer = SplitBodyServicer(trainer.slot, "run", "none", round_number=3, log=lambda line: None)
    kind = pb.SplitMessage.ACTIVATIONS
    message = pb.SplitMessage(run_id="run", round=3, client_id="client-9", step=1, kind=kind)
    message.tensor.SetInParent()
    with pytest.raises(WireError, match="'client-9' does not train in round 3"):
        servicer._answer(message, StreamState(), context=None)


def test_split_streams_need_the_sender_s_token_and_a_place_in_the_round():
    config = RunConfig(method="fedbert", clients=2)
    tokens = TokenBook([("client-0", "token-0"), ("client-1", "token-1")])
    run = RunDescription("run", config, 0, ("cls",), "fingerprint", b"")
    federation = FederationServicer(run, tokens, heartbeat_s=0.2, log=lambda line: None)
    trainer = make_trainer("sequential")
    trainer.begin_round(1, ["client-0"])
    split = SplitBodyServicer(trainer.slot, "run", "none", round_number=1, log=lambda line: None)
    transport = GrpcTransport(federation, "127.0.0.1:0", 2, 600.0, split=split)
    channel = grpc.insecure_channel(transport.address)
    split_stub = pb_grpc.SplitStub(split_channel(f"127.0.0.1:{federation.split_port}"))
    try:
        for client in ("client-0", "client-1"):
            request = pb.JoinRequest(client_id=client, num_examples=4)
            reply = pb_grpc.FederationStub(channel).Join(
                request, metadata=bearer_metadata(f"token-{client[-1]}")
            )
            assert reply.split_port == federation.split_port != 0
        message = pb.SplitMessage(
            run_id="run", round=1, client_id="client-1", step=1, kind=pb.SplitMessage.ACTIVATIONS
        )
        message.tensor.CopyFrom(
            tensor_message(make_codec("none").encode("activations", torch.zeros(1, 2, 4)))
        )
        for token, code, reason in (
            (None, grpc.StatusCode.UNAUTHENTICATED, "bearer token"),
            ("token-0", grpc.StatusCode.PERMISSION_DENIED, "belongs to 'client-0'"),
            ("token-1", grpc.StatusCode.INVALID_ARGUMENT, "'client-1' does not train in round 1"),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                replies = split_stub.Exchange(iter([message]), metadata=bearer_metadata(token))
                next(replies)
            assert refused.value.code() == code and reason in refused.value.details()
        assert split.take_traffic().get("client-1", (0, 0))[1] == 0, "nothing was answered"
        # The Split server's limit fits a micro-batch; the federation's own stays chunk-sized.
        federation.open_round(1, [0], {"cls.predictions.bias": torch.zeros(8)}, 60.0)
        oversized = pb.Chunk(
            run_id="run", round=1, client_id="client-0", index=0, last=True, data=bytes(2 << 20)
        )
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.FederationStub(channel).PushUpdate(iter([oversized]), metadata=bearer_metadata("token-0"))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        channel.close()
        transport.close()


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--split-strategy", "relay"], "unknown split-strategy 'relay'"),
        (["--split-codec", "int4"], "split codec 'int4' is not one of"),
        (["--max-grad-norm", "-1"], "max-grad-norm must be 0"),
        (["--profiles", "jetson-agx-orin-64gb-maxn"], "takes no device profiles"),
    ],
)
def test_bad_pretraining_options_are_one_clear_error(
    flags, error, tiny_model_dir, reviews_dir, tmp_path, capsys
):
    argv = ["run", "--method", "fedbert", "--model", str(tiny_model_dir), "--data", str(reviews_dir)]
    assert main([*argv, *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1
