"""The records that cross module lines: states, encoded tensors, client updates, rounds and their metrics.

Everything here is plain data. The round loop (edgefed/federation/loop.py) produces `RoundMetrics`;
the recorder, the summary, the bench and the simulated clock consume it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # torch stays unimported here, so the command line starts without it
    import torch

# Named tensors: a model's communicated (trainable) state, a delta, a server's setup.
State = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class AdapterSpec:
    """Hyperparameters shared by the methods (each uses what applies to it)."""

    rank: int = 8
    alpha: float = 8.0
    # A run's spec names its model family's (edgefed/families/) where its settings name none.
    target_modules: tuple[str, ...] = ("query", "value")
    # Modules the pre-trained checkpoint lacked (the classification head): always trained.
    head_modules: tuple[str, ...] = ("classifier",)
    # FFDAPT: what stays frozen (`embeddings`, `layers:<i>` or `layers:<i>-<j>`); by default the
    # embeddings (with the MLM decoder tied to them) and the first layer.
    freeze: tuple[str, ...] = ("embeddings", "layers:0")
    # What peft calls the model (its model family's TaskType, edgefed/families/): SEQ_CLS for a
    # classifier, None for peft's generic wrapper.
    peft_task_type: str | None = "SEQ_CLS"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Pieces:
    """Bytes that arrived split over several chunks, kept as views into those chunks: a receiver checks
    them piece by piece and joins them (one copy) only when the tensor is first read."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: tuple[memoryview, ...]) -> None:
        self.parts = parts
        self.size = sum(len(part) for part in parts)

    def __len__(self) -> int:
        return self.size

    @staticmethod
    def of(field: bytes | memoryview | Pieces) -> tuple[bytes | memoryview, ...]:
        """A bytes field's parts, in order: its pieces, or the field itself."""
        return field.parts if isinstance(field, Pieces) else (field,)

    def join(self) -> memoryview:
        """The bytes in one new writable buffer."""
        joined = memoryview(bytearray(self.size))
        position = 0
        for part in self.parts:
            joined[position : position + len(part)] = part
            position += len(part)
        return joined


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor as a codec wrote it: name, shape and dtype beside the codec's byte fields, so the wire
    format (protobuf, never pickle) maps it field by field; `nbytes` is what it costs on the wire."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the tensor's own dtype, restored by decoding
    codec: str
    # values: raw, fp16, int8, packed int4 or the kept top-k values; a received tensor's fields are views
    # into the chunks it arrived in, `Pieces` where it spans chunks (edgefed.wire.framing)
    data: bytes | memoryview | Pieces
    scales: bytes | memoryview | Pieces = b""  # float32 per block (int8, int4)
    indices: bytes | memoryview | Pieces = b""  # int32 flat positions (top-k)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.scales) + len(self.indices)


@dataclass
class ClientUpdate:
    """What one client sends back after local training."""

    client_id: int
    # local − global, one entry per communicated tensor. On the server it is the update as it arrived
    # (edgefed.codecs.EncodedDelta): decoded per tensor on first use, and the aggregators' fused path
    # reads quantised tensors without decoding them.
    delta: Mapping[str, torch.Tensor]
    # n_k: the client's training examples; FedAvg weight p_k = n_k / Σ n_j. A server bounding the
    # clients' shares (--max-client-share) lowers it for the round (edgefed.aggregators.bounded_shares).
    num_examples: float
    train_loss: float  # mean loss over the client's local steps
    steps: int
    train_s: float  # wall-clock seconds of local training on this machine
    # The client's trained model on a held-out slice of its own labelled data (few-shot runs:
    # FewFedWeight's adaptive aggregation weighs clients by it); None: not measured.
    score: float | None = None
    # Joules the device drew over its local round, from its power sensors; None: not measured.
    energy_j: float | None = None


@dataclass
class RoundResult:
    """What a transport brings back from one round."""

    updates: list[ClientUpdate]
    dropped: list[int] = field(default_factory=list)  # sampled: died, stalled, refused or missed a deadline
    bytes_up: int = 0  # gRPC message bytes of the state streams, as sent
    bytes_down: int = 0
    client_bytes: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot -> (down, up)
    # Split learning (FedBERT): gRPC message bytes of the Split streams, (up, down); None without a split.
    split_bytes: tuple[int, int] | None = None


class Evaluation(NamedTuple):
    """The global model on the evaluation set."""

    accuracy: float
    loss: float
    exit_accuracy: list[float] | None = None  # early-exit models: the accuracy at each exit
    mlm_loss: float | None = None  # masked-LM pre-training: the loss over masked tokens (= loss)
    task_accuracy: dict[str, float] | None = None  # multi-task runs: each task's accuracy
    # Decoder LMs: label answers by greedy generation (exact match; `accuracy` scores each label's
    # likelihood), and the answer tokens' perplexity (exp of `loss`).
    generated_accuracy: float | None = None
    perplexity: float | None = None


# Field metadata: `timing` marks figures measured on this machine (they differ between otherwise
# identical runs); `optional` marks fields written to metrics.jsonl only when they apply.
TIMING = {"timing": True}
OPTIONAL = {"optional": True}


@dataclass
class RoundMetrics:
    """One line of metrics.jsonl: a completed round (round 0: the starting model)."""

    round: int
    accuracy: float
    loss: float
    train_loss: float | None  # the clients' mean local loss, weighted by their examples
    bytes_up: int
    bytes_down: int
    clients: list[int]  # the slots whose updates were aggregated
    dropped: list[int]
    slowest_client_s: float = field(metadata=TIMING)
    # Each client's measured training and bytes (down, up), in `clients` order, and the server's
    # aggregation: what a critical-path clock needs (edgefed/bench replays them per profile).
    client_train_s: list[float] = field(metadata=TIMING)
    client_bytes: list[list[int]]
    aggregate_s: float = field(metadata=TIMING)
    round_s: float = field(metadata=TIMING)
    wall_s: float = field(metadata=TIMING)
    # The simulated device clock (edgefed/devices/clock.py): never measured on a device.
    sim_s: float | None = None
    sim_round_s: float | None = None
    sim_slowest_client: int | None = None
    # Each client's local steps, in `clients` order (absent from runs recorded before it was).
    client_steps: list[int] | None = None
    # The plans (edgefed/devices/planner.py Plan, as a dict) of the clients that joined since the last
    # record, by slot: which device trained what.
    plans: dict[str, dict[str, Any]] | None = field(default=None, metadata=OPTIONAL)
    exit_accuracy: list[float] | None = field(default=None, metadata=OPTIONAL)
    mlm_loss: float | None = field(default=None, metadata=OPTIONAL)
    generated_accuracy: float | None = field(default=None, metadata=OPTIONAL)
    perplexity: float | None = field(default=None, metadata=OPTIONAL)
    split_bytes_up: int | None = field(default=None, metadata=OPTIONAL)
    split_bytes_down: int | None = field(default=None, metadata=OPTIONAL)
    # Multi-task runs: each task's test accuracy (`accuracy` is the mean over the trained tasks), and
    # the clients' held-out scores in `clients` order.
    task_accuracy: dict[str, float] | None = field(default=None, metadata=OPTIONAL)
    client_scores: list[float] | None = field(default=None, metadata=OPTIONAL)
    # Each client's energy over its round in joules, in `clients` order, and where it comes from:
    # "measured" (the device's power sensors) or "simulated" (its profile's power budget × its simulated
    # round, edgefed/devices/clock.py); None where neither is known.
    client_energy_j: list[float | None] | None = field(default=None, metadata=OPTIONAL)
    client_energy_source: list[str | None] | None = field(default=None, metadata=OPTIONAL)

    def to_json(self) -> dict[str, Any]:
        """The metrics.jsonl record: every field, less optional ones that do not apply."""
        return {
            key: value
            for key, value in asdict(self).items()
            if not (value is None and key in OPTIONAL_FIELDS)
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> RoundMetrics:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})

    def without_timing(self) -> dict[str, Any]:
        """The record less what was measured on this machine: equal for runs that computed the same."""
        return {key: value for key, value in self.to_json().items() if key not in TIMING_FIELDS}


@dataclass(frozen=True)
class TimeToTarget:
    """Seconds until the first round at the target accuracy: this machine's training wall clock, and the
    simulated device clock (edgefed/devices/clock.py; fleets with device profiles only). None: never."""

    wall: float | None
    simulated: float | None


@dataclass(frozen=True)
class RunSummary:
    """summary.json: what a finished run trained, reached and sent (edgefed/federation/report.py)."""

    method: str
    task: str
    aggregator: str
    codec: str
    transport: str
    model: str
    clients: int
    rounds: int
    train_source: str
    eval_source: str
    train_examples: int
    eval_examples: int
    num_labels: int
    head_modules: list[str]
    trainable_parameters: int
    total_parameters: int
    final_accuracy: float
    final_loss: float
    final_mlm_loss: float | None
    final_exit_accuracy: list[float] | None
    final_task_accuracy: dict[str, float] | None
    best_accuracy: float
    best_round: int
    target_accuracy: float | None
    rounds_to_target: int | None
    time_to_target_s: TimeToTarget
    profiles: list[str]
    plans: dict[str, dict[str, Any]]  # slot -> its plan (planner.plan_record)
    sim_s: float | None
    energy_j: dict[str, float]  # "measured" / "simulated" -> joules
    bytes_up: int
    bytes_down: int
    split_bytes_up: int
    split_bytes_down: int
    setup_bytes_per_client: int
    wall_s: float
    total_s: float
    run_dir: str
    result_dir: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> RunSummary:
        known = {f.name for f in fields(cls)}
        missing = sorted(known - record.keys())
        if missing:
            raise ValueError(f"a run summary without {', '.join(missing)}")
        values = {key: value for key, value in record.items() if key in known}
        return cls(**{**values, "time_to_target_s": TimeToTarget(**values["time_to_target_s"])})


TIMING_FIELDS = tuple(f.name for f in fields(RoundMetrics) if f.metadata.get("timing"))
OPTIONAL_FIELDS = tuple(f.name for f in fields(RoundMetrics) if f.metadata.get("optional"))


def client_name(index: int) -> str:
    """Simulated client `index`'s id (in-process, and in the processes of `edgefed run --transport grpc`)."""
    return f"client-{index}"
