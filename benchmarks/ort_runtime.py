"""A client on ONNX Runtime against a client on torch: local step time, peak memory, install size, and
(with --accuracy) a federation mixing both against a torch-only one. Measured side by side in one run.

- step time: one client's local round of FeDeRA (or LoRA) on all-MiniLM-L6-v2, the same batches,
  each runtime in processes of its own, launched in turn (ORT, torch, ORT, ...); each process runs
  two rounds and its second counts; the median over processes of s per step.
  The ORT process cannot import torch or transformers (they are marked absent), as on a device
  without them; it reads pre-encoded numpy batches and the artifacts the server made.
- peak RSS: the processes' largest peak resident memory (VmHWM) after their rounds, imports included.
- install size: the bytes on disk of the distributions each client imports (their RECORD files), from
  this environment: for torch, edgefed's dependencies; for ORT, onnxruntime-training-cpu, numpy,
  tokenizers and what they need.
- --accuracy: the demo (FeDeRA, 4 clients, 16 rounds) with every client on torch, then with every
  other client on ORT (client-runtime torch,ort).

    python benchmarks/ort_runtime.py [--method federa] [--rounds 4] [--accuracy] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from publish import publish

from edgefed.client import build_worker
from edgefed.config import resolve_config
from edgefed.data import shuffled_batches
from edgefed.methods import trainable_state
from edgefed.models import load_tokenizer, resolve_model_path
from edgefed.ort.artifacts import write_artifacts
from edgefed.ort.local import graph_inputs

ROOT = Path(__file__).resolve().parents[1]
ABSENT = "import sys\nfor absent in ('torch', 'transformers'):\n    sys.modules[absent] = None\n"

# One local round in a fresh process: timed rounds, then the process's peak RSS (VmHWM: ru_maxrss would
# report the parent's peak, which a forked child inherits on Linux).
ORT_ROUND = """
import json, re, sys, time, numpy as np
from pathlib import Path
from edgefed.ort.trainer import OrtTrainer, UpdateRule
folder = Path(sys.argv[1])
spec = json.loads((folder / "spec.json").read_text())
state = dict(np.load(folder / "state.npz"))
packed = np.load(folder / "batches.npz")
batches = [
    {n.split(":")[1]: packed[n] for n in packed.files if n.startswith(f"{k}:")} for k in range(spec["steps"])
]
trainer = OrtTrainer(folder / "ort", spec["trainable"], UpdateRule(spec["lr"], "adamw", spec["clip"]))
seconds = []
for _ in range(spec["rounds"]):
    seconds.append(trainer.fit(state, batches).seconds / spec["steps"])
loaded = [m for m, module in sys.modules.items() if module is not None and m.split(".")[0] == "torch"]
rss_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"step_s": seconds, "rss_kib": rss_kib, "torch": loaded}))
"""

TORCH_ROUND = """
import json, re, sys, torch, numpy as np
from pathlib import Path
from edgefed.client import build_worker
from edgefed.config import resolve_config
from edgefed.models import load_tokenizer, resolve_model_path
torch.set_num_threads(int(sys.argv[2]))
folder = Path(sys.argv[1])
spec = json.loads((folder / "spec.json").read_text())
config = resolve_config(None, spec["config"])
task = config.task()
path = resolve_model_path(config.model)
base, heads = task.load_model(path, 2)
worker = build_worker(config, base, tuple(heads), torch.device("cpu"), None)
train, _ = task.load_data(config.data_settings())
examples = task.encode_client(train, load_tokenizer(path), config.max_seq_len, config.data_settings())
state = {k: torch.from_numpy(v) for k, v in dict(np.load(folder / "state.npz")).items()}
seconds = []
for _ in range(spec["rounds"]):  # seed 0: the batches the server side encoded for the ORT client
    seconds.append(worker.trainer.fit(0, state, examples, spec["steps"], seed=0).train_s / spec["steps"])
rss_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"step_s": seconds, "rss_kib": rss_kib}))
"""


def prepare(folder: Path, method: str, steps: int, rounds: int) -> tuple[dict, float]:
    """The server's side: artifacts, a global state, the client's encoded batches; and the seconds
    the artifacts took to make."""
    settings = {"method": method, "batch_size": 16, "max_seq_len": 64}
    config = resolve_config(None, settings)
    task = config.task()
    base, heads = task.load_model(resolve_model_path(config.model), 2)
    worker = build_worker(config, base, tuple(heads), torch.device("cpu"), None)
    trainable = list(trainable_state(worker.model))
    start = time.perf_counter()
    write_artifacts(worker.model, trainable, folder / "ort")
    artifacts_s = time.perf_counter() - start
    train, _ = task.load_data(config.data_settings())
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    examples = task.encode_client(train, tokenizer, config.max_seq_len, config.data_settings())
    generator = torch.Generator().manual_seed(0)
    batches = [
        graph_inputs(examples.batch(indices, generator))
        for indices in shuffled_batches(len(examples), config.batch_size, steps, generator)
    ]
    state = {name: tensor.numpy() for name, tensor in trainable_state(worker.model).items()}
    np.savez(folder / "state.npz", **state)
    np.savez(folder / "batches.npz", **{f"{k}:{n}": b[n] for k, b in enumerate(batches) for n in b})
    spec = {
        "trainable": trainable, "lr": worker.trainer.lr, "clip": config.max_grad_norm, "steps": steps,
        "rounds": rounds, "config": settings,
    }  # fmt: skip
    (folder / "spec.json").write_text(json.dumps(spec))
    return spec, artifacts_s


def measure(script: str, folder: Path, threads: int) -> dict:
    command = [sys.executable, "-c", script, str(folder), str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def requirement_names(name: str) -> list[str]:
    names = []
    for requirement in metadata.requires(name) or []:
        if "extra ==" in requirement:
            continue
        marker = requirement.split(";", 1)
        if len(marker) == 2 and not evaluate_marker(marker[1]):
            continue
        names.append(re.split(r"[ <>=!~\[(;]", requirement.strip(), maxsplit=1)[0])
    return names


def evaluate_marker(text: str) -> bool:
    from packaging.markers import Marker

    return Marker(text).evaluate()


def closure_bytes(roots: list[str]) -> tuple[int, list[str]]:
    """Bytes on disk of `roots` and every distribution they require, installed here."""
    seen, todo, total = set(), list(roots), 0
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            files = metadata.files(name) or []
        except metadata.PackageNotFoundError:
            continue
        total += sum(file.size or 0 for file in files)
        todo += requirement_names(name)
    return total, sorted(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="federa", choices=("federa", "lora"))
    parser.add_argument("--steps", type=int, default=10, help="local steps of a round")
    parser.add_argument("--rounds", type=int, default=4, help="process launches per runtime, in turn")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--accuracy", action="store_true", help="also the demo, torch-only against mixed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        _, artifacts_s = prepare(folder, args.method, args.steps, 2)
        sizes = {
            path.name: path.stat().st_size for path in (folder / "ort").iterdir() if path.suffix != ".log"
        }
        # Processes in turn, ORT then torch, `rounds` times: a slow spell of this machine hits both.
        launches = [
            (measure(ABSENT + ORT_ROUND, folder, args.threads), measure(TORCH_ROUND, folder, args.threads))
            for _ in range(args.rounds)
        ]
    assert all(ort["torch"] == [] for ort, _ in launches), "the ORT client imported torch"
    torch_bytes, torch_dists = closure_bytes(["torch", "transformers", "peft", "safetensors", "tokenizers"])
    ort_bytes, ort_dists = closure_bytes(["onnxruntime-training-cpu", "numpy", "tokenizers"])
    # Each launch runs two rounds; the second (warm) one counts.
    ort_step = statistics.median(ort["step_s"][-1] for ort, _ in launches)
    torch_step = statistics.median(torch_run["step_s"][-1] for _, torch_run in launches)
    ort = {"rss_kib": max(ort["rss_kib"] for ort, _ in launches)}
    torch_run = {"rss_kib": max(torch_run["rss_kib"] for _, torch_run in launches)}
    lines = [
        f"`python benchmarks/ort_runtime.py --method {args.method}{' --accuracy' * args.accuracy}` on "
        f"{platform.machine()} ({args.threads} threads), torch {torch.__version__}, "
        f"onnxruntime-training-cpu {metadata.version('onnxruntime-training-cpu')}.",
        "",
        f"## One client's local round: {args.method} on all-MiniLM-L6-v2, batch 16, 64 tokens, "
        f"{args.steps} steps",
        "",
        "| | torch | ONNX Runtime | ORT / torch |",
        "|---|---:|---:|---:|",
        f"| s per local step (median of {args.rounds} processes each) | {torch_step:.3f} | {ort_step:.3f} | "
        f"{ort_step / torch_step:.2f} |",
        f"| peak RSS of the client process, MB | {torch_run['rss_kib'] / 1024:.0f} | "
        f"{ort['rss_kib'] / 1024:.0f} | "
        f"{ort['rss_kib'] / torch_run['rss_kib']:.2f} |",
        f"| installed size of what the client imports, MB | {torch_bytes / 1e6:.0f} | "
        f"{ort_bytes / 1e6:.0f} | "
        f"{ort_bytes / torch_bytes:.2f} |",
        "",
        f"Artifacts (made once per run by the server in {artifacts_s:.1f} s): "
        + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(sizes.items()))
        + ". The ORT process ran with torch and transformers marked absent.",
        "",
        f"Distributions counted for torch: {', '.join(torch_dists)}.",
        f"For ONNX Runtime: {', '.join(ort_dists)}.",
    ]
    if args.accuracy:
        lines += [
            "",
            "## The demo (FeDeRA, 4 clients, 16 rounds): every client on torch, or every other on ORT",
            "",
        ]
        lines += accuracy_rows()
    publish(lines, args.out)


def accuracy_rows() -> list[str]:
    from edgefed.federation.runner import run

    rows = ["| clients | final accuracy | best accuracy | wall s |", "|---|---:|---:|---:|"]
    for runtimes in ("torch", "torch,ort"):
        out = ROOT / "runs" / f"ort-demo-{runtimes.replace(',', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = run(
            resolve_config(None, {"client_runtime": runtimes, "out": str(out)}), echo=lambda line: None
        )
        label = "all torch" if runtimes == "torch" else "torch and ORT in turn"
        rows.append(
            f"| {label} | {summary['final_accuracy']:.4f} | {summary['best_accuracy']:.4f} | "
            f"{summary['wall_s']:.0f} |"
        )
        print(f"ran the demo with client-runtime {runtimes}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
