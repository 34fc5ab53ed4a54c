"""Measure a plan's peak training memory in a fresh process, to check the cost model's prediction.

The child process (edgefed/client/probe.py) builds a real worker and runs local steps under the
plan's workload; this side starts it and reads its one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from edgefed.devices.costmodel import Workload
from edgefed.errors import EdgefedError


@dataclass(frozen=True)
class PeakMemory:
    measured_bytes: int
    predicted_bytes: float
    device: str

    @property
    def error(self) -> float:
        """(predicted − measured) / measured."""
        return (self.predicted_bytes - self.measured_bytes) / self.measured_bytes


def measure_peak_memory(
    model: str,
    method: str,
    rank: int,
    work: Workload,
    steps: int = 2,
    threads: int = 1,
    timeout_s: float = 600,
) -> PeakMemory:
    """Run `steps` local steps of `method` under `work` in a fresh process; measured and predicted peak."""
    request = {"model": model, "method": method, "rank": rank, "steps": steps, **asdict(work)}
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-m", "edgefed.client.probe", json.dumps(request)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        raise EdgefedError(f"peak-memory probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return PeakMemory(**json.loads(done.stdout.strip().splitlines()[-1]))
