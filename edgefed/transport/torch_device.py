"""The torch runtime of `edgefed client`: the pre-trained model adapted with the server's setup state,
trained by edgefed's LocalTrainer (the one worker builder, edgefed/client/worker.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from edgefed.client import build_worker
from edgefed.components import config_from_text, data_settings, task_of
from edgefed.devices.fleet import scope_of_plan
from edgefed.devices.planner import plan_from_text
from edgefed.errors import EdgefedError
from edgefed.methods import trainable_state
from edgefed.models import default_device, load_tokenizer, model_fingerprint, resolve_model_path
from edgefed.split import RemoteBody, split_channel
from edgefed.transport.base import LOSSLESS, state_shapes
from edgefed.wire.device import DeviceLink
from edgefed.wire.framing import Expected, Received
from edgefed.wire.reader import parse_state
from edgefed.wire.sending import EncodedUpdate
from edgefed.wire.v1 import federation_pb2 as pb


class TorchDevice:
    def __init__(self, link: DeviceLink, threads: int | None = None) -> None:
        self.link = link
        if threads is not None:
            torch.set_num_threads(threads)

    def build(self, joined: pb.JoinReply) -> None:
        link = self.link
        config = config_from_text(joined.config_toml, f"{link.server} (the run's configuration)")
        task = task_of(config)
        model_path = resolve_model_path(link.model or config.model)
        base, new_modules = task.load_model(model_path, joined.num_labels)
        mine = model_fingerprint(base, new_modules)
        if mine != joined.model_fingerprint:
            raise EdgefedError(
                f"the model at {model_path} differs from the server's (fingerprint {mine[:12]} vs "
                f"{joined.model_fingerprint[:12]}); load the same pre-trained model (--model PATH)"
            )
        plan = plan_from_text(joined.plan_toml) if joined.plan_toml else None
        examples = task.encode_client(
            task.client_data(link.data),
            load_tokenizer(model_path),
            plan.seq_len if plan else config.max_seq_len,
            data_settings(config),
        )
        link.declare(len(examples))
        expected = Expected(link.run_id, 0, None, link.client_id)
        setup = parse_state(link.fetch("FetchSetup"), LOSSLESS, expected)
        self.device = default_device()
        worker = build_worker(config, base, tuple(joined.head_modules), self.device, setup)
        remote_body = None
        if worker.method.splits_model:  # FedBERT: the body runs on the server, over the Split stream
            host = link.server.rsplit(":", 1)[0]
            remote_body = RemoteBody(
                split_channel(f"{host}:{joined.split_port}", link.tls),
                link.run_id,
                worker.method.settings.split_codec,
                link.client_id,
                metadata=link.metadata,
            )
        state = trainable_state(worker.model)
        shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
        scope = scope_of_plan(plan, shapes, worker.method.low_rank_pairs(worker.model)) if plan else None
        self.shapes = state_shapes({name: state[name] for name in (scope.received if scope else state)})
        self.chunk_bytes = config.chunk_bytes
        self.client = worker.client(joined.client_index, examples, plan, scope, remote_body)
        if plan is not None:
            link.echo(
                f"edgefed: {link.client_id}: plan for {plan.profile}: layers {plan.frozen_layers}-"
                f"{plan.exit_layer - 1} train, rank {plan.rank}, batch {plan.batch_size}, "
                f"length {plan.seq_len}"
            )
        link.echo(
            f"edgefed: {link.client_id} is client {joined.client_index} of run {link.run_id}: "
            f"{config.method} on {len(examples):,} examples from {Path(link.data).name}, "
            f"{self.client.steps} local steps, {self.device.type}"
        )

    def fit(self, round_number: int, payload: Received) -> EncodedUpdate:
        expected = Expected(self.link.run_id, round_number, self.shapes, self.link.client_id)
        state = parse_state(payload, LOSSLESS, expected)
        return self.client.fit(round_number, {k: v.to(self.device) for k, v in state.items()})
