"""`edgefed run --transport grpc`: a Federation server on 127.0.0.1 and one `edgefed client` process
per client, each with only its own shard of the data and its own bearer token.

The shards are the in-process simulation's (same partition, same order) and the clients' slots
follow the token file's order, so for the same seed the run computes what `--transport inproc` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from edgefed.config import RunConfig
from edgefed.data import LabeledTexts, partition
from edgefed.devices.fleet import FleetPlans
from edgefed.errors import EdgefedError
from edgefed.split import SplitBodyServicer
from edgefed.transport.auth import TOKEN_ENV, TokenBook
from edgefed.transport.grpc_server import FederationServicer, GrpcTransport, RunDescription
from edgefed.types import client_name


class LoopbackFleet(GrpcTransport):
    @classmethod
    def start(
        cls,
        description: RunDescription,
        train: LabeledTexts,
        fleet: FleetPlans,
        device: torch.device,
        run_dir: Path,
        slots: dict[str, int],
        log: Callable[[str], None],
        split: SplitBodyServicer | None,
    ) -> LoopbackFleet:
        """Serve the run on 127.0.0.1 and start one client process per client on its own shard."""
        config = description.config
        names = [client_name(index) for index in range(config.clients)]
        tokens = TokenBook.generate(names)
        servicer = FederationServicer(description, tokens, slots, device=device, log=log, fleet=fleet)
        loopback = cls(servicer, config.min_clients or config.clients, config.round_deadline_s, split)
        try:
            loopback._spawn(train, config, names, tokens, run_dir / "clients")
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
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []
        self.shard_dir: tempfile.TemporaryDirectory | None = None
        super().__init__(servicer, "127.0.0.1:0", min_clients, deadline_s, watchdog=self.check, split=split)

    def _spawn(
        self, train: LabeledTexts, config: RunConfig, names: list[str], tokens: TokenBook, log_dir: Path
    ) -> None:
        self.shard_dir = tempfile.TemporaryDirectory(prefix="edgefed-shards-")
        shard_files = write_shards(train, config, Path(self.shard_dir.name))
        threads = max(1, (os.cpu_count() or 1) // config.clients)
        log_dir.mkdir(parents=True, exist_ok=True)
        for name, data in zip(names, shard_files, strict=True):
            command = [
                sys.executable, "-m", "edgefed", "client", "--server", self.address, "--data", str(data),
                "--name", name, "--threads", str(threads),
            ]  # fmt: skip
            environment = {**os.environ, TOKEN_ENV: tokens.token_for(name)}
            log_path = log_dir / f"{name}.log"
            with log_path.open("ab") as log_file:
                process = subprocess.Popen(
                    command, stdout=log_file, stderr=subprocess.STDOUT, env=environment
                )
            self.processes.append((name, process, log_path))

    def check(self) -> None:
        """Stop the run when a client process has exited before the run finished."""
        for name, process, log_path in self.processes:
            status = process.poll()
            if status is not None and not self.servicer.finished:
                tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
                raise EdgefedError(f"{name} exited with status {status} ({log_path}): " + " | ".join(tail))

    def close(self) -> None:
        for _, process, _ in self.processes:
            try:
                process.wait(timeout=10 if self.servicer.finished else 0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        super().close()
        if self.shard_dir is not None:
            self.shard_dir.cleanup()


def write_shards(train: LabeledTexts, config: RunConfig, folder: Path) -> list[Path]:
    """Each simulated client's data as its own JSONL file: the in-process partition, in the same order."""
    paths = []
    for index, shard in enumerate(partition(train.labels, config.clients, config.partition, config.seed)):
        path = folder / f"{client_name(index)}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in shard:
                handle.write(json.dumps({"text": train.texts[row], "label": train.labels[row]}) + "\n")
        paths.append(path)
    return paths
