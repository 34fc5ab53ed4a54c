"""What crosses Flower's wire, as Flower records: the global state and the setup state as plain
Arrays (lossless, any Flower tool reads them), a client's update as Arrays of stype
`edgefed.v1.Tensor`, each one encoded tensor in edgefed's wire form (codec bytes, scales, indices and
their CRC32C, edgefed/wire/framing.py). Stock strategies cannot average those, which is why an edgefed
run on Flower runs edgefed's own round (FlowerTransport); the server checks them as every edgefed
transport does (PayloadReader) before they can touch the round."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from edgefed.client import EncodedUpdate
from edgefed.codecs import Codec
from edgefed.errors import EdgefedError
from edgefed.types import State
from edgefed.wire.framing import Expected, WireError
from edgefed.wire.reader import PayloadReader
from edgefed.wire.sending import state_payload_of
from edgefed.wire.v1 import federation_pb2 as pb

TENSOR_STYPE = "edgefed.v1.Tensor"
UPDATE, REPORT = "update", "report"


def state_record(state: State) -> ArrayRecord:
    return ArrayRecord(
        {name: Array(torch_tensor=tensor.detach().cpu().contiguous()) for name, tensor in state.items()}
    )


def state_from_record(record: ArrayRecord) -> State:
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """The bytes of a record's arrays: what the message spends on tensors (Flower's framing apart)."""
    return sum(len(array.data) for array in record.values())


def update_content(update: EncodedUpdate) -> RecordDict:
    """A client's reply: its encoded tensors, and what FedAvg and the metrics need of it."""
    tensors = pb.StatePayload.FromString(update.payload).tensors
    arrays = {
        tensor.name: Array(
            dtype=tensor.dtype, shape=tuple(tensor.shape), stype=TENSOR_STYPE, data=tensor.SerializeToString()
        )
        for tensor in tensors
    }
    report = {"num_examples": update.num_examples, "train_loss": update.train_loss, "steps": update.steps}
    report["train_s"] = update.train_s
    if update.score is not None:
        report["score"] = update.score
    return RecordDict({UPDATE: ArrayRecord(arrays), REPORT: MetricRecord(report)})


def checked_reply(content: RecordDict, codec: Codec, expected: Expected):
    """A reply's tensors, checked as every transport checks a pushed update, and its report as the
    first-chunk header edgefed's checks read (`edgefed.transport.base.checked_update`)."""
    if UPDATE not in content or REPORT not in content:
        raise WireError(f"a reply without '{UPDATE}' and '{REPORT}' records")
    arrays = content[UPDATE]
    if any(array.stype != TENSOR_STYPE for array in arrays.values()):
        raise WireError(f"an update's arrays must be of stype {TENSOR_STYPE}")
    payload = state_payload_of(array.data for array in arrays.values())
    report = content[REPORT]
    try:
        header = pb.Chunk(
            num_examples=int(report["num_examples"]),
            train_loss=float(report["train_loss"]),
            steps=int(report["steps"]),
            train_s=float(report["train_s"]),
            **({"score": float(report["score"])} if "score" in report else {}),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise WireError(f"a reply's report lacks or garbles {error}") from None
    return PayloadReader(codec, expected).finish(payload), header


def config_value(config, key: str, kind: type, origin: str):
    """A value of a Flower ConfigRecord (or run/node config), of the kind expected, or a clear error."""
    if key not in config:
        raise EdgefedError(f"{origin}: '{key}' is missing")
    value = config[key]
    if not isinstance(value, kind):
        raise EdgefedError(f"{origin}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value
