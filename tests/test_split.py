"""Split learning: a tiny BERT cut at its body (embeddings and MLM head on the client, encoder on a
gRPC server) trains as the uncut model does, and bad messages are refused while the server carries on."""

import copy
import dataclasses
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
import torch
from torch import nn
from transformers import BertForMaskedLM

from edgefed.errors import EdgefedError
from edgefed.methods.fedbert.bert import BertBody, BertMaskedLMClient
from edgefed.split import (
    BodySlot,
    RemoteBody,
    SplitBodyServicer,
    SplitError,
    serve_split_body,
    split_channel,
    split_codec,
)
from edgefed.split.wire import MASK_CODEC
from edgefed.wire.framing import tensor_message
from edgefed.wire.v1 import federation_pb2 as pb
from edgefed.wire.v1 import federation_pb2_grpc as pb_grpc
from tests.tiny import tiny_bert_config
from tests.tolerance import assert_as_accurate_in_norm

VOCAB, HIDDEN, BATCH, SEQ, STEPS = 120, 32, 6, 12, 4
MASK_ID = 4
Kind = pb.SplitMessage.Kind


def tiny_bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = tiny_bert_config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config)


def mlm_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random token batches, padded to SEQ, with 30 % of the real tokens masked and labelled."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(MASK_ID + 1, VOCAB, (BATCH, SEQ), generator=generator)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=generator)
        mask = (torch.arange(SEQ) < lengths[:, None]).long()
        chosen = (torch.rand(BATCH, SEQ, generator=generator) < 0.3) & mask.bool()
        batches.append((torch.where(chosen, MASK_ID, ids) * mask, mask, torch.where(chosen, ids, -100)))
    return batches


def adamw(parameters) -> torch.optim.Optimizer:
    # lr 1e-2 moves a random model far enough in 4 steps for a wrong gradient path to show.
    return torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.01)


@dataclass
class Run:
    losses: list[float]
    params: dict[str, torch.Tensor]  # named as in BertForMaskedLM


def trained(loss_of: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer) -> list[float]:
    """The per-step losses of ordinary torch training (the split server steps its body on its own)."""
    losses = []
    for ids, mask, labels in mlm_batches():
        optimizer.zero_grad()
        loss = loss_of(ids, mask, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def snapshot(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + name: p.detach().clone() for name, p in model.named_parameters()}


def run_uncut(initial: BertForMaskedLM) -> Run:
    model = copy.deepcopy(initial)
    losses = trained(
        lambda ids, mask, labels: model(input_ids=ids, attention_mask=mask, labels=labels).loss,
        adamw(model.parameters()),
    )
    return Run(losses, snapshot(model))


def run_local(initial: BertForMaskedLM, wrap: Callable[[nn.Module], nn.Module], train_body: bool) -> Run:
    """A deliberately broken training, to show that the tolerances catch it."""
    model = copy.deepcopy(initial)
    client = BertMaskedLMClient(model, wrap(BertBody(model.bert)))
    trainable = [p for name, p in client.named_parameters() if train_body or not name.startswith("body.")]
    losses = trained(lambda ids, mask, labels: client(ids, mask, labels=labels).loss, adamw(trainable))
    return Run(losses, snapshot(model))


class CutGradient(nn.Module):
    """A body whose input gradient never reaches the client."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(hidden_states.detach(), attention_mask)


def run_split(initial: BertForMaskedLM, spec: str) -> tuple[Run, tuple[int, int]]:
    client_model = copy.deepcopy(initial)
    body = BertBody(copy.deepcopy(initial.bert))  # the server's own copy, as on another machine
    servicer = SplitBodyServicer(BodySlot(body, adamw(body.parameters())), "run-1", spec)
    server, port = serve_split_body(servicer)
    channel = split_channel(f"127.0.0.1:{port}")
    try:
        with RemoteBody(channel, "run-1", spec, client_id="c0") as remote:
            client = BertMaskedLMClient(client_model, remote)
            losses = trained(
                lambda ids, mask, labels: client(ids, mask, labels=labels).loss, adamw(client.parameters())
            )
            traffic = (remote.bytes_sent, remote.bytes_received)
    finally:
        channel.close()
        server.stop(None)
    params = {n: p for n, p in snapshot(client_model).items() if ".encoder." not in n}
    return Run(losses, {**params, **snapshot(body, "bert.")}), traffic


def update_error(run: Run, reference: Run, initial: dict[str, torch.Tensor]) -> float:
    """How far a run's parameter updates are from the reference's, relative to the reference's, on
    the worse of the two sides (client: embeddings and head; server: encoder)."""
    errors = []
    for on_server in (False, True):
        names = [name for name in reference.params if (".encoder." in name) == on_server]
        moved = torch.cat([(reference.params[n] - initial[n]).flatten() for n in names])
        wrong = torch.cat([(run.params[n] - reference.params[n]).flatten() for n in names])
        errors.append(float(wrong.norm() / moved.norm()))
    return max(errors)


def loss_error(run: Run, reference: Run) -> float:
    return max(abs(a - b) for a, b in zip(run.losses, reference.losses, strict=True))


@pytest.fixture(scope="module")
def initial() -> BertForMaskedLM:
    return tiny_bert()


@pytest.fixture(scope="module")
def uncut(initial) -> Run:
    return run_uncut(initial)


def test_split_with_the_lossless_codec_trains_as_the_uncut_model(initial, uncut):
    run, _ = run_split(initial, "none")
    assert run.params.keys() == uncut.params.keys()
    # Cut in two, the model computes in another order: as accurate as the uncut float32 run against
    # the uncut float64 run (softmax-invariant key biases aside: AdamW steps rounding noise by ±lr).
    exact = run_uncut(copy.deepcopy(initial).double())
    assert_as_accurate_in_norm(run.losses, uncut.losses, exact.losses, "losses", terms=HIDDEN)
    compared = [name for name in uncut.params if not name.endswith("attention.self.key.bias")]
    assert_as_accurate_in_norm(
        *({name: params[name] for name in compared} for params in (run.params, uncut.params, exact.params)),
        "parameters",
        terms=HIDDEN,
    )


# Bounds on (update error, loss error). fp16 rounds each value to 11 significant bits (≈ 5e-4
# relative), bf16 to 8 (≈ 4e-3), int8 to 1/254 of its 64-value block's largest magnitude. AdamW divides
# every gradient element by its own running RMS, so rounding that flips a near-zero element's sign moves
# that weight by a whole learning-rate step, and update errors come out larger than the rounding.
# Measured here: update errors 1.4e-3, 2.3e-2, 9.4e-2 and loss errors 7e-6, 6e-5, 1.6e-3. The bounds sit
# 2-15 times above those and 2-5 times below the broken trainings of the next test (a body that never
# trains: 1.0 and 9.7e-3; no gradient across the cut: 0.54 and 4.1e-2).
TOLERANCES = {"fp16": (1e-2, 1e-4), "bf16": (0.1, 1e-3), "int8": (0.2, 4e-3)}


@pytest.mark.parametrize("spec", sorted(TOLERANCES))
def test_split_with_a_compact_codec_trains_within_its_dtype_tolerance(initial, uncut, spec):
    run, _ = run_split(initial, spec)
    update_bound, loss_bound = TOLERANCES[spec]
    assert update_error(run, uncut, snapshot(initial)) < update_bound
    assert loss_error(run, uncut) < loss_bound


def test_the_tolerances_fail_a_body_that_never_trains_or_a_gradient_that_never_crosses(initial, uncut):
    start = snapshot(initial)
    loosest_update = max(update for update, _ in TOLERANCES.values())
    loosest_loss = max(loss for _, loss in TOLERANCES.values())
    for broken in (run_local(initial, lambda body: body, False), run_local(initial, CutGradient, True)):
        assert update_error(broken, uncut, start) > loosest_update
        assert loss_error(broken, uncut) > loosest_loss


def test_compact_codecs_cut_the_traffic(initial):
    traffic = {spec: run_split(initial, spec)[1] for spec in ("none", "fp16", "int8")}
    for spec, (low, high) in {"fp16": (0.45, 0.55), "int8": (0.25, 0.33)}.items():
        for direction in (0, 1):
            assert low < traffic[spec][direction] / traffic["none"][direction] < high, (spec, direction)


# -- bad input -------------------------------------------------------------------------------------

CODEC = split_codec("fp16")


@pytest.fixture(scope="module")
def served():
    """A split server for the tiny BERT's body (fp16 on the wire) and a raw stub to talk to it."""
    body = BertBody(tiny_bert().bert)
    slot = BodySlot(body, adamw(body.parameters()))
    servicer = SplitBodyServicer(slot, "run-1", "fp16", log=lambda _: None)
    server, port = serve_split_body(servicer)
    channel = split_channel(f"127.0.0.1:{port}")
    yield servicer, pb_grpc.SplitStub(channel), channel
    channel.close()
    server.stop(None)


def message(kind: int, step: int, tensor: torch.Tensor, name: str, **fields) -> pb.SplitMessage:
    defaults = {"run_id": "run-1", "round": 0, "client_id": "c0"}
    encoded = tensor_message(fields.pop("codec", CODEC).encode(name, tensor))
    return pb.SplitMessage(**{**defaults, **fields}, step=step, kind=kind, tensor=encoded)


def activations(step: int, tensor: torch.Tensor | None = None, mask: torch.Tensor | None = None, **fields):
    tensor = torch.randn(BATCH, SEQ, HIDDEN) if tensor is None else tensor
    sent = message(Kind.ACTIVATIONS, step, tensor, "activations", **fields)
    mask = torch.ones(BATCH, SEQ, dtype=torch.uint8) if mask is None else mask
    sent.attention_mask.CopyFrom(tensor_message(MASK_CODEC.encode("attention_mask", mask)))
    return sent


def gradient(step: int, tensor: torch.Tensor | None = None, **fields) -> pb.SplitMessage:
    tensor = 1e-3 * torch.randn(BATCH, SEQ, HIDDEN) if tensor is None else tensor
    return message(Kind.OUTPUT_GRADIENT, step, tensor, "output_gradient", **fields)


def tampered() -> pb.SplitMessage:
    sent = activations(1)
    sent.tensor.data = bytes([sent.tensor.data[0] ^ 1]) + sent.tensor.data[1:]
    return sent


def truncated() -> pb.SplitMessage:
    """Bytes that do not fit the shape, under a matching CRC32C."""
    encoded = CODEC.encode("activations", torch.randn(BATCH, SEQ, HIDDEN))
    sent = activations(1)
    sent.tensor.CopyFrom(tensor_message(dataclasses.replace(encoded, data=encoded.data[:-2])))
    return sent


def poisoned(value: float) -> torch.Tensor:
    tensor = torch.randn(BATCH, SEQ, HIDDEN)
    tensor[0, 0, 0] = value
    return tensor


BAD_STREAMS = {
    "gradient without activations": (
        lambda: [gradient(1)],
        r"OUTPUT_GRADIENT of step 1 without its ACTIVATIONS \(no forward is waiting\)",
    ),
    "gradient of another step": (
        lambda: [activations(1), gradient(2)],
        r"OUTPUT_GRADIENT of step 2 without its ACTIVATIONS \(step 1 is waiting\)",
    ),
    "gradient twice": (
        lambda: [activations(1), gradient(1), gradient(1)],
        r"OUTPUT_GRADIENT of step 1 without its ACTIVATIONS \(no forward",
    ),
    "a server's kind": (
        lambda: [message(Kind.BODY_OUTPUT, 1, torch.zeros(2), "body_output")],
        "a client sends ACTIVATIONS or OUTPUT_GRADIENT, not BODY_OUTPUT",
    ),
    "repeated step": (lambda: [activations(3), activations(3)], "ACTIVATIONS of step 3 after step 3"),
    "gradient shape": (
        lambda: [activations(1), gradient(1, torch.zeros(BATCH, SEQ, HIDDEN // 2))],
        r"tensor output_gradient: float32\[6, 12, 16\] where float32\[6, 12, 32\] is expected",
    ),
    "gradient dtype": (
        lambda: [activations(1), gradient(1, torch.zeros(BATCH, SEQ, HIDDEN, dtype=torch.float64))],
        r"tensor output_gradient: float64\[6, 12, 32\] where float32\[6, 12, 32\]",
    ),
    "activations the body cannot take": (
        lambda: [activations(1, torch.zeros(BATCH, SEQ, HIDDEN // 2))],
        r"step 1: the body cannot take activations of shape \[6, 12, 16\]",
    ),
    "mask shape": (
        lambda: [activations(1, mask=torch.ones(BATCH, SEQ - 1, dtype=torch.uint8))],
        r"tensor attention_mask: uint8\[6, 11\] where uint8\[6, 12\]",
    ),
    "NaN activations": (lambda: [activations(1, poisoned(float("nan")))], "tensor activations: NaN or Inf"),
    "Inf gradient": (
        lambda: [activations(1), gradient(1, poisoned(float("inf")))],
        "tensor output_gradient: NaN or Inf",
    ),
    "CRC32C": (lambda: [tampered()], "tensor activations: CRC32C mismatch"),
    "truncated tensor": (lambda: [truncated()], "tensor activations: data holds 4606 bytes, 4608 expected"),
    "wrong run id": (lambda: [activations(1, run_id="run-2")], "wrong run id 'run-2'"),
    "wrong round": (lambda: [activations(1, round=5)], "round 5 is not the current round 0"),
    "another sender": (
        lambda: [activations(1), gradient(1, client_id="c1")],
        "message from 'c1' in the stream of 'c0'",
    ),
    "codec": (
        lambda: [activations(1, codec=split_codec("none"))],
        "tensor activations: codec 'none', this run uses 'fp16'",
    ),
}


def exchange(stub, messages: list[pb.SplitMessage]) -> list[pb.SplitMessage]:
    return list(stub.Exchange(iter(messages), timeout=30))


def let_go(servicer: SplitBodyServicer) -> None:
    """Wait for the server's handler threads to let go of finished streams: a caller sees a stream's
    status before the thread that served it has unwound, and a client holds at most two streams."""
    deadline = time.monotonic() + 10
    while servicer.guard.open_streams() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert servicer.guard.open_streams() == 0


@pytest.mark.parametrize("case", sorted(BAD_STREAMS))
def test_bad_messages_are_refused_and_the_server_carries_on(served, case):
    servicer, stub, _ = served
    messages, error = BAD_STREAMS[case]
    let_go(servicer)
    with pytest.raises(grpc.RpcError) as refused:
        exchange(stub, messages())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(error, refused.value.details()), refused.value.details()
    steps = servicer.slot_for("").version
    let_go(servicer)
    replies = exchange(stub, [activations(1), gradient(1)])
    assert [(reply.kind, reply.step) for reply in replies] == [
        (Kind.BODY_OUTPUT, 1),
        (Kind.INPUT_GRADIENT, 1),
    ]
    for reply in replies:
        assert tuple(reply.tensor.shape) == (BATCH, SEQ, HIDDEN) and reply.tensor.codec == "fp16"
    assert servicer.slot_for("").version == steps + 1


def test_a_refusal_reaches_the_client_as_an_error_with_the_servers_message(served):
    _, _, channel = served
    with RemoteBody(channel, "run-2", "fp16") as remote, pytest.raises(SplitError) as refused:
        remote(torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(refused.value) == "split server refused ACTIVATIONS of step 1: wrong run id 'run-2'"
    with pytest.raises(EdgefedError, match="split codec 'int4' is not one of: none, fp16, bf16, int8"):
        RemoteBody(channel, "run-1", "int4")
    nowhere = split_channel("127.0.0.1:1")
    with (
        RemoteBody(nowhere, "run-1") as remote,
        pytest.raises(SplitError, match="split server is unreachable"),
    ):
        remote(torch.randn(BATCH, SEQ, HIDDEN))
    nowhere.close()


def test_a_gradient_after_another_client_stepped_the_body_is_refused_and_the_client_recovers(served):
    _, _, channel = served
    with (
        RemoteBody(channel, "run-1", "fp16", "a") as first,
        RemoteBody(channel, "run-1", "fp16", "b") as second,
    ):
        inputs = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
        stale = first(inputs).sum()
        second(inputs).sum().backward()
        with pytest.raises(SplitError, match="another client stepped the body since its forward") as refused:
            stale.backward()
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        first(inputs).sum().backward()  # a new stream
        assert inputs.grad is not None and torch.isfinite(inputs.grad).all()


def test_one_micro_batch_at_a_time(served):
    _, _, channel = served
    with RemoteBody(channel, "run-1", "fp16") as remote:
        inputs = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
        earlier = remote(inputs).sum()
        remote(inputs).sum().backward()
        with pytest.raises(SplitError, match="backward of step 1 after the forward of step 2"):
            earlier.backward()


def test_a_client_whose_last_streams_the_server_still_counts_opens_its_next_one(served):
    """A client may hold two streams; one whose earlier streams have not yet ended on the server is
    refused at first, and its RemoteBody opens the stream again once they have."""
    servicer, stub, channel = served
    held = threading.Event()

    def silent():
        held.wait()
        yield from ()

    lingering = [stub.Exchange(silent()) for _ in range(2)]  # same channel: the same caller
    deadline = time.monotonic() + 5
    while servicer.guard.open_streams() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    threading.Timer(0.2, held.set).start()  # the earlier streams end a moment later
    with RemoteBody(channel, "run-1", "fp16") as remote:
        output = remote(torch.randn(BATCH, SEQ, HIDDEN))
    assert output.shape == (BATCH, SEQ, HIDDEN)
    for call in lingering:
        call.cancel()


def test_the_body_trains_behind_frozen_client_layers(served):
    """No input of the cut requires grad, yet the server must still get the gradient at its output."""
    servicer, _, channel = served
    steps = servicer.slot_for("").version
    with RemoteBody(channel, "run-1", "fp16") as remote:
        with torch.no_grad():  # evaluation: the server's forward is dropped by the next one
            remote(torch.randn(BATCH, SEQ, HIDDEN))
        remote(torch.randn(BATCH, SEQ, HIDDEN)).pow(2).sum().backward()
    assert servicer.slot_for("").version == steps + 1
