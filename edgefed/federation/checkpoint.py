"""The server's checkpoint, written after every completed round so a killed server resumes exactly.

`checkpoint/` in the run directory holds the round, the run id, the clients (slots, declared example
counts and session tokens' digests), the global trainable state, the aggregator's state, the RNG
states and the rounds' metrics (metrics.jsonl up to that round, so they never run ahead of the
state). It is written to a temporary folder and swapped in with a rename
(edgefed/federation/atomic.py), so a kill at any moment leaves the previous round's checkpoint
whole.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from edgefed.errors import EdgefedError
from edgefed.federation.atomic import replace_dir, staging_dir
from edgefed.transport.base import Roster
from edgefed.types import State

DIRNAME = "checkpoint"
METRICS = "metrics.jsonl"


@dataclass
class Checkpoint:
    round: int  # the last completed round
    run_id: str
    global_state: State
    wall_s: float  # training wall clock up to that round
    aggregator_state: State = field(default_factory=dict)
    clients: Roster = field(default_factory=Roster)  # who joined, so rejoining keeps slot and count
    rng: dict = field(default_factory=dict)
    sim_s: float | None = None  # the simulated device clock up to that round (fleets with profiles)
    server_state: State = field(default_factory=dict)  # what only the server trains (FedBERT's body)
    metrics_jsonl: str = ""  # metrics.jsonl up to `round`


def rng_state() -> dict:
    """Python's, NumPy's and torch's global generators (JSON-able)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    final = run_dir / DIRNAME
    staging = staging_dir(final)
    tensors = {f"global.{name}": t.detach().cpu().contiguous() for name, t in checkpoint.global_state.items()}
    tensors.update(
        {
            f"aggregator.{name}": t.detach().cpu().contiguous()
            for name, t in checkpoint.aggregator_state.items()
        }
    )
    tensors.update(
        {f"server.{name}": t.detach().cpu().contiguous() for name, t in checkpoint.server_state.items()}
    )
    save_file(tensors, staging / "state.safetensors")
    meta = {
        "round": checkpoint.round,
        "run_id": checkpoint.run_id,
        "wall_s": checkpoint.wall_s,
        "sim_s": checkpoint.sim_s,
        "clients": checkpoint.clients.slots,
        "examples": checkpoint.clients.examples,
        "sessions": checkpoint.clients.sessions,
        "rng": checkpoint.rng,
    }
    (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (staging / METRICS).write_text(checkpoint.metrics_jsonl, encoding="utf-8")
    replace_dir(staging, final)


def checkpoint_folder(run_dir: Path) -> Path | None:
    """The run's checkpoint folder (None: the run stopped before its first one)."""
    for folder in (run_dir / DIRNAME, run_dir / f"{DIRNAME}.old"):  # .old: killed between the two renames
        if (folder / "meta.json").is_file():
            return folder
    return None


def load_checkpoint(run_dir: Path) -> Checkpoint:
    folder = checkpoint_folder(run_dir)
    if folder is None:
        raise EdgefedError(f"{run_dir}: no checkpoint to resume from (a run writes one after each round)")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        tensors = load_file(folder / "state.safetensors")
        metrics_jsonl = (folder / METRICS).read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        raise EdgefedError(f"{folder}: unreadable checkpoint ({error})") from None
    return Checkpoint(
        round=meta["round"],
        run_id=meta["run_id"],
        global_state={k.removeprefix("global."): v for k, v in tensors.items() if k.startswith("global.")},
        wall_s=meta["wall_s"],
        aggregator_state={
            k.removeprefix("aggregator."): v for k, v in tensors.items() if k.startswith("aggregator.")
        },
        clients=Roster(meta["clients"], meta["examples"], meta["sessions"]),
        rng=meta["rng"],
        sim_s=meta.get("sim_s"),
        server_state={k.removeprefix("server."): v for k, v in tensors.items() if k.startswith("server.")},
        metrics_jsonl=metrics_jsonl,
    )
