"""The ClientApp's side: each Flower node is one edgefed client, built by the worker builder every
edgefed client uses (edgefed/client/worker.py) from what the ServerApp's messages carry.

A simulation may hand a node's messages to any of its Ray actors, so what must follow the node —
FeDeRA's setup state and the codec's error-feedback residual — lives in the node's own state
(`context.state`, which Flower keeps per node), and what every node of a run shares — the
configuration, the pre-trained model in one worker, the drawn shards — is cached per process.
Memory per node is then its data and its residual, not a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from edgefed.client import FederatedClient, Worker, build_worker
from edgefed.components import config_from_text, data_settings, task_of
from edgefed.config import RunConfig
from edgefed.devices.fleet import scope_of_plan
from edgefed.devices.planner import Plan, plan_from_text
from edgefed.errors import EdgefedError
from edgefed.flower.records import config_value, state_from_record, state_record, update_content
from edgefed.methods import trainable_state
from edgefed.models import default_device, load_tokenizer, model_fingerprint, resolve_model_path

SETUP, FEEDBACK, FEEDBACK_BEFORE, FEEDBACK_ROUND = (
    "edgefed.setup",
    "edgefed.residual",
    "edgefed.before",
    "edgefed.ef",
)


@dataclass
class Run:
    """What one process keeps of a run: its configuration, the shared worker, and its nodes' clients."""

    config: RunConfig
    num_labels: int
    head_modules: tuple[str, ...]
    fingerprint: str
    tokenizer: Any
    shards: list[Any] | None = None  # simulated: every client's shard, drawn as the server draws them
    encoded: dict[tuple[int, int], Any] = field(default_factory=dict)  # (slot, length) -> its data
    worker: Worker | None = None
    clients: dict[int, FederatedClient] = field(default_factory=dict)  # slot -> client


RUNS: dict[str, Run] = {}  # run id -> what this process keeps of it


def join(message: Message, context: Context) -> Message:
    """A node's answer to the ServerApp's first message: its slot and its declared training examples."""
    run, slot = run_of(message), node_slot(context)
    joined = ConfigRecord({"slot": slot, "num_examples": len(encoded_data(run, slot, context, None))})
    return Message(RecordDict({"joined": joined}), reply_to=message)


def train(message: Message, context: Context) -> Message:
    """One round of local training from the global state in `message`; the encoded delta back."""
    settings, origin = message.content["config"], "the ServerApp's train message"
    round_number = config_value(settings, "round", int, origin)
    plan_toml = config_value(settings, "plan_toml", str, origin)
    run, slot = run_of(message), node_slot(context)
    if "setup" in message.content:  # a node's first round: it keeps the setup state from now on
        context.state[SETUP] = message.content["setup"]
    if run.worker is None:
        if SETUP not in context.state:
            raise EdgefedError("a train message reached a node that never got the run's setup state")
        run.worker = build_run_worker(run, state_from_record(context.state[SETUP]))
    client = run.clients.get(slot)
    if client is None:
        plan = plan_from_text(plan_toml) if plan_toml else None
        client = run.clients[slot] = node_client(run, slot, context, plan)
    restore_feedback(client, context.state)
    device = next(run.worker.model.parameters()).device
    global_state = state_from_record(message.content["global"])
    update = client.fit(round_number, {name: tensor.to(device) for name, tensor in global_state.items()})
    keep_feedback(client, context.state)
    return Message(update_content(update), reply_to=message)


def run_of(message: Message) -> Run:
    """The run a message belongs to, from its `run` record (parsed once per process)."""
    record, origin = message.content["run"], "the ServerApp's message"
    run_id = config_value(record, "run_id", str, origin)
    if run_id not in RUNS:
        config = config_from_text(config_value(record, "config_toml", str, origin), origin)
        RUNS[run_id] = Run(
            config,
            config_value(record, "num_labels", int, origin),
            tuple(config_value(record, "head_modules", list, origin)),
            config_value(record, "model_fingerprint", str, origin),
            load_tokenizer(resolve_model_path(config.model)),
        )
    return RUNS[run_id]


def node_slot(context: Context) -> int:
    """The edgefed client a node is: its simulation partition id, or `slot` in its node config."""
    for key in ("partition-id", "slot"):
        if key in context.node_config:
            return int(context.node_config[key])
    raise EdgefedError("a SuperNode needs --node-config 'slot=<client index>' (simulations set partition-id)")


def encoded_data(run: Run, slot: int, context: Context, plan: Plan | None):
    """The node's data, tokenised: its own file or folder (`data` in its node config) or, simulated,
    the shard the server draws for that client (the partition every edgefed transport uses). Read and
    tokenised once per process: the join counts it, the first round trains on it."""
    config = run.config
    seq_len = plan.seq_len if plan else config.max_seq_len
    if (slot, seq_len) in run.encoded:
        return run.encoded[slot, seq_len]
    task, settings = task_of(config), data_settings(config)
    if "data" in context.node_config:
        shard = task.client_data(str(context.node_config["data"]))
    elif "partition-id" in context.node_config:
        if run.shards is None:
            run.shards = task.shards(task.load_data(settings)[0], settings)
        shard = run.shards[slot]
    else:
        raise EdgefedError(
            "this SuperNode has no data: start it with "
            "--node-config \"slot=<client> data='<file or folder>'\""
        )
    encoded = run.encoded[slot, seq_len] = task.encode_client(shard, run.tokenizer, seq_len, settings)
    return encoded


def build_run_worker(run: Run, setup) -> Worker:
    config = run.config
    base, new_modules = task_of(config).load_model(resolve_model_path(config.model), run.num_labels)
    mine = model_fingerprint(base, new_modules)
    if mine != run.fingerprint:
        raise EdgefedError(
            f"this node's model {config.model} differs from the server's (fingerprint {mine[:12]} vs "
            f"{run.fingerprint[:12]})"
        )
    return build_worker(config, base, run.head_modules, default_device(), setup)


def node_client(run: Run, slot: int, context: Context, plan: Plan | None) -> FederatedClient:
    worker, scope = run.worker, None
    if plan is not None:
        shapes = {name: tuple(tensor.shape) for name, tensor in trainable_state(worker.model).items()}
        scope = scope_of_plan(plan, shapes, worker.method.low_rank_pairs(worker.model))
    return worker.client(slot, encoded_data(run, slot, context, plan), plan, scope)


def restore_feedback(client: FederatedClient, state: RecordDict) -> None:
    """The node's error-feedback residual, wherever its previous round ran."""
    if FEEDBACK_ROUND not in state:
        client.feedback.restore(None, {}, {})
        return
    round_number = int(state[FEEDBACK_ROUND]["round"])
    client.feedback.restore(
        round_number if round_number >= 0 else None,
        state_from_record(state[FEEDBACK]),
        state_from_record(state[FEEDBACK_BEFORE]),
    )


def keep_feedback(client: FederatedClient, state: RecordDict) -> None:
    round_number, residual, before = client.feedback.state()
    state[FEEDBACK_ROUND] = ConfigRecord({"round": -1 if round_number is None else round_number})
    state[FEEDBACK], state[FEEDBACK_BEFORE] = state_record(residual), state_record(before)
