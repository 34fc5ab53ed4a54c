"""Measure a plan's peak training memory in a fresh process, to check the cost model's prediction.

The child process builds the adapted model (random weights from the model's config: no checkpoint
is read, so no file pages inflate the reading), applies the plan's scope, and runs local steps of
the real trainer (`LocalTrainer.fit`) on full-length random token ids. On CPU a thread samples the
resident set size (psutil) every millisecond; the peak above the RSS measured just before the model
was built is the training memory. On CUDA it is `torch.cuda.max_memory_allocated`.

    python -m edgefed.peakmem '{"model": PATH, "method": "federa", "rank": 8, "frozen_layers": 0, ...}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass

from edgefed.costmodel import Workload, peak_memory_bytes
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
        [sys.executable, "-m", "edgefed.peakmem", json.dumps(request)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        raise EdgefedError(f"peak-memory probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return PeakMemory(**json.loads(done.stdout.strip().splitlines()[-1]))


def _probe(request: dict) -> PeakMemory:
    import psutil
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from edgefed.data import EncodedExamples
    from edgefed.fleet import adapt_and_measure
    from edgefed.methods import METHODS, AdapterSpec, trainable_state
    from edgefed.models import resolve_model_path
    from edgefed.scope import client_scope
    from edgefed.training import LocalTrainer

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Workload(
        *(request[key] for key in ("frozen_layers", "exit_layer", "rank", "batch_size", "seq_len"))
    )
    # Warm up the allocator, thread pools and autograd before the baseline.
    warm = torch.randn(64, 64, requires_grad=True)
    (warm @ warm).sum().backward()
    config = AutoConfig.from_pretrained(resolve_model_path(request["model"]), num_labels=2)
    process = psutil.Process()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = process.memory_info().rss
    base = AutoModelForSequenceClassification.from_config(config)
    method = METHODS.create(request["method"])
    spec = AdapterSpec(rank=request["rank"], alpha=float(request["rank"]))
    model, _, shape = adapt_and_measure(method, base, spec)
    state = trainable_state(model)
    pairs = method.low_rank_pairs(model)
    scope = client_scope(
        {name: tuple(t.shape) for name, t in state.items()},
        pairs,
        work.frozen_layers,
        work.exit_layer,
        work.rank,
    )
    generator = torch.Generator().manual_seed(0)
    count = work.batch_size * request["steps"]
    ids = torch.randint(1000, config.vocab_size, (count, work.seq_len), generator=generator).tolist()
    examples = EncodedExamples(ids, [i % 2 for i in range(count)], config.pad_token_id or 0)
    trainer = LocalTrainer(model, lr=1e-3, batch_size=work.batch_size, device=device)
    received = {name: state[name].to(device) for name in scope.received}
    peak = [process.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        trainer.fit(0, received, examples, request["steps"], 0, scope=scope, exit_layer=work.exit_layer)
    finally:
        stop.set()
        sampler.join()
    measured = torch.cuda.max_memory_allocated() - baseline if device.type == "cuda" else peak[0] - baseline
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    return PeakMemory(int(measured), peak_memory_bytes(shape, work, accelerator), device.type)


if __name__ == "__main__":
    print(json.dumps(asdict(_probe(json.loads(sys.argv[1])))))
