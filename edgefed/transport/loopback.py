"""`edgefed run --transport grpc`: a Federation server on 127.0.0.1 and one `edgefed client` process
per client, each with only its own shard of the data and its own bearer token.

The shards are the in-process simulation's (same partition, same order) and the clients' slots
follow the token file's order, so for the same seed the run computes what `--transport inproc` does.

The client processes fork from a server of multiprocessing's (`forkserver`) that has imported torch,
transformers and the client's code once, so each starts in a fraction of a second instead of paying
those imports again; each is still a process of its own, which builds its model from the files and
talks to the server over gRPC only. The fork server is a fresh interpreter: it never touched CUDA.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgefed.config import RunConfig
from edgefed.devices.fleet import FleetPlans
from edgefed.devices.profiles import device_entry
from edgefed.errors import EdgefedError, report_errors
from edgefed.models import resolve_model_path
from edgefed.setup import RunSetup
from edgefed.split import SplitBodyServicer
from edgefed.tasks import Task
from edgefed.transport.auth import TokenBook
from edgefed.transport.base import Roster, RunContext
from edgefed.transport.grpc_server import GrpcTransport
from edgefed.transport.servicer import FederationServicer, RunDescription, run_description
from edgefed.types import client_name

# What a client process imports before it forks: all it needs to train (torch's runtime; an ort client
# process has torch loaded too, and does not use it).
CLIENT_MODULE = "edgefed.transport.torch_device"


@dataclass(frozen=True)
class Loopback:
    """`edgefed run --transport grpc`: the run served on 127.0.0.1 to one client process per client."""

    def open(self, setup: RunSetup, run: RunContext) -> LoopbackFleet:
        return LoopbackFleet.start(
            run_description(setup, run.run_id, run.run_dir),
            setup.task,
            setup.shards,
            setup.fleet,
            setup.device,
            run.run_dir,
            run.roster,
            run.log,
            run.split.servicer if run.split else None,
        )


class LoopbackFleet(GrpcTransport):
    @classmethod
    def start(
        cls,
        description: RunDescription,
        task: Task,
        shards: list[Any],
        fleet: FleetPlans | None,
        device: torch.device,
        run_dir: Path,
        roster: Roster,
        log: Callable[[str], None],
        split: SplitBodyServicer | None,
    ) -> LoopbackFleet:
        """Serve the run on 127.0.0.1 and start one client process per client on its own shard."""
        config = description.config
        names = [client_name(index) for index in range(config.clients)]
        tokens = TokenBook.generate(names)
        servicer = FederationServicer(description, tokens, roster, device=device, log=log, fleet=fleet)
        loopback = cls(servicer, config.min_clients or config.clients, config.round_deadline_s, split)
        try:
            loopback.shard_dir = tempfile.TemporaryDirectory(prefix="edgefed-shards-")
            files = write_shards(task, shards, Path(loopback.shard_dir.name))
            loopback._spawn(files, config, names, tokens, run_dir / "clients")
        except BaseException:
            loopback.close()
            raise
        return loopback

    def __init__(
        self,
        servicer: FederationServicer,
        min_clients: int,
        deadline_s: float,
        split: SplitBodyServicer | None = None,
    ) -> None:
        self.processes: list[tuple[str, multiprocessing.process.BaseProcess, Path]] = []
        self.shard_dir: tempfile.TemporaryDirectory | None = None
        super().__init__(servicer, "127.0.0.1:0", min_clients, deadline_s, watchdog=self.check, split=split)

    def _spawn(
        self, shard_files: list[Path], config: RunConfig, names: list[str], tokens: TokenBook, log_dir: Path
    ) -> None:
        threads = max(1, (os.cpu_count() or 1) // config.clients)
        log_dir.mkdir(parents=True, exist_ok=True)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([CLIENT_MODULE])
        fleet = self.servicer.clients.fleet
        model = str(resolve_model_path(config.model))  # its own: the Join reply names no server path
        for index, (name, data) in enumerate(zip(names, shard_files, strict=True)):
            log_path = log_dir / f"{name}.log"
            # Each client announces its device, as `edgefed client --profile` on the device does.
            profile = device_entry(fleet.entry_for(index))[0] if fleet is not None and fleet.profiles else ""
            token = tokens.token_for(name)
            runtime = config.client_runtime[index % len(config.client_runtime)]
            process = context.Process(
                target=client_process,
                args=(
                    self.address,
                    str(data),
                    name,
                    token,
                    threads,
                    str(log_path),
                    profile,
                    runtime,
                    model,
                ),
                name=name,
            )
            process.start()
            self.processes.append((name, process, log_path))

    def check(self) -> None:
        """Stop the run when a client process has exited before the run finished."""
        for name, process, log_path in self.processes:
            status = process.exitcode
            if status is not None and not self.servicer.finished:
                tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
                raise EdgefedError(f"{name} exited with status {status} ({log_path}): " + " | ".join(tail))

    def close(self) -> None:
        for _, process, _ in self.processes:
            process.join(timeout=10 if self.servicer.finished else 0)
            if process.exitcode is None:
                process.kill()
                process.join()
        super().close()
        if self.shard_dir is not None:
            self.shard_dir.cleanup()


def client_process(
    server: str,
    data: str,
    name: str,
    token: str,
    threads: int,
    log_path: str,
    profile: str = "",
    runtime: str = "torch",
    model: str | None = None,
) -> None:
    """A client process: `edgefed client --profile PROFILE --runtime RUNTIME --model MODEL` for one
    shard, writing to its log (its server's own model: the Join reply names no server path)."""
    from edgefed.transport.grpc_client import GrpcClient

    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)

    def train() -> int:
        GrpcClient(
            server, data, name, token=token, profile=profile, model=model, runtime=runtime, threads=threads
        ).run()
        return 0

    sys.exit(report_errors(train))


def write_shards(task: Task, shards: list[Any], folder: Path) -> list[Path]:
    """Each simulated client's data as its own files: the in-process shards, in the same order."""
    return [task.write_shard(shard, folder / client_name(index)) for index, shard in enumerate(shards)]
