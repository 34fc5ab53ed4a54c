"""The peak-memory probe's child process: local steps of a real worker under a plan's workload.

    python -m edgefed.client.probe '{"model": PATH, "method": "federa", "rank": 8, "frozen_layers": 0, ...}'

It builds the worker with the one worker builder from random weights of the model's config (no
checkpoint is read, so no file pages inflate the reading), applies the plan's scope, and runs local
steps of its trainer on full-length random token ids. On CPU a thread samples the resident set size
(psutil) every millisecond; the peak above the RSS measured just before the model was built is the
training memory. On CUDA it is `torch.cuda.max_memory_allocated`. It prints one JSON line, read by
`edgefed.devices.peakmem.measure_peak_memory`.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import asdict

import psutil
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from edgefed.client.worker import build_worker
from edgefed.components import adapter_spec
from edgefed.config import RunConfig
from edgefed.data import EncodedExamples
from edgefed.devices.costmodel import Workload, peak_memory_bytes
from edgefed.devices.fleet import measure_shape
from edgefed.devices.peakmem import PeakMemory
from edgefed.methods import METHODS, trainable_state
from edgefed.models import default_device, resolve_model_path
from edgefed.scope import client_scope


def probe(request: dict) -> PeakMemory:
    torch.manual_seed(0)
    device = default_device()
    work = Workload(
        *(request[key] for key in ("frozen_layers", "exit_layer", "rank", "batch_size", "seq_len"))
    )
    settings_type = METHODS.settings_type(request["method"])
    shaping = {"rank": work.rank, "alpha": float(work.rank)}  # as far as the method takes them
    config = RunConfig(
        method=request["method"],
        method_settings=settings_type.from_values(
            {k: v for k, v in shaping.items() if k in settings_type.fields()}
        ),
        batch_size=work.batch_size,
        max_seq_len=work.seq_len,
        lr=1e-3,
    )
    # Warm up the allocator, thread pools and autograd before the baseline.
    warm = torch.randn(64, 64, requires_grad=True)
    (warm @ warm).sum().backward()
    model_config = AutoConfig.from_pretrained(resolve_model_path(request["model"]), num_labels=2)
    process = psutil.Process()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = process.memory_info().rss
    base = AutoModelForSequenceClassification.from_config(model_config)
    base_params = list(base.parameters())
    worker = build_worker(config, base, ("classifier",), device, setup=None)
    shape = measure_shape(
        worker.method, worker.model, base_params, adapter_spec(config, worker.method, ("classifier",))
    )
    state = trainable_state(worker.model)
    scope = client_scope(
        {name: tuple(t.shape) for name, t in state.items()},
        worker.method.low_rank_pairs(worker.model),
        work.frozen_layers,
        work.exit_layer,
        work.rank,
    )
    generator = torch.Generator().manual_seed(0)
    count = work.batch_size * request["steps"]
    ids = torch.randint(1000, model_config.vocab_size, (count, work.seq_len), generator=generator).tolist()
    examples = EncodedExamples(ids, [i % 2 for i in range(count)], model_config.pad_token_id or 0)
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
        worker.trainer.fit(
            0, received, examples, request["steps"], 0, scope=scope, exit_layer=work.exit_layer
        )
    finally:
        stop.set()
        sampler.join()
    measured = torch.cuda.max_memory_allocated() - baseline if device.type == "cuda" else peak[0] - baseline
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    return PeakMemory(int(measured), peak_memory_bytes(shape, work, accelerator), device.type)


if __name__ == "__main__":
    print(json.dumps(asdict(probe(json.loads(sys.argv[1])))))
