"""`edgefed client --runtime ort` against `edgefed client` on torch: local step time, peak memory, install
size, and (with --accuracy) a federation mixing both against a torch-only one. Measured in one run.

- step time and memory: an `edgefed server` (FeDeRA or LoRA on all-MiniLM-L6-v2, batch 16, 64 tokens,
  one client) and one real `edgefed client` process over loopback gRPC, launched in turn (ORT, torch,
  ORT, ...). The ORT client runs where torch and transformers cannot be imported, as on a device
  without them: it fetches the artifacts, tokenizer and manifest from the server and tokenises its own
  data. Step time: the client's training seconds of a round (the server's metrics) over its steps;
  the first round is a warm-up; the median over the later rounds of every launch.
- peak RSS: the client process's VmHWM, read every 0.1 s while it runs; the largest over its launches.
- install size: the bytes on disk (RECORD files, in this environment) of what each client installs:
  edgefed's own dependencies plus its `torch` extra, or plus its `ort` extra; and what those require.
- --accuracy: the demo (FeDeRA, 4 clients, 16 rounds) with every client on torch, then with every
  other client on ORT (client-runtime torch,ort): in process (the ORT clients draw torch's batches),
  and as client processes over gRPC (the ORT ones as devices do: their own tokenizer and batch order).

    python benchmarks/ort_runtime.py [--method federa] [--launches 2] [--accuracy] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from publish import publish

from edgefed.data import SAMPLE_DIR
from edgefed.federation.recorder import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ABSENT = "import sys\nfor absent in ('torch', 'transformers'):\n    sys.modules[absent] = None\n"
LAUNCH = "import sys\nfrom edgefed.cli import main\nsys.exit(main({argv!r}))\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it has exited
        return 0
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) if found else 0


def served_client(runtime: str, folder: Path, method: str, steps: int, rounds: int, threads: int) -> dict:
    """One `edgefed server` with one `edgefed client --runtime RUNTIME`; the client's step times, its
    peak RSS and its setup download."""
    address, out = f"127.0.0.1:{free_port()}", folder / f"run-{runtime}-{time.monotonic_ns()}"
    server = ["server", "--address", address, "--clients", "1", "--rounds", str(rounds), "--method", method]
    server += ["--local-steps", str(steps), "--batch-size", "16", "--max-seq-len", "64", "--out", str(out)]
    client = ["client", "--server", address, "--data", str(SAMPLE_DIR), "--name", "device"]
    client += ["--runtime", runtime, "--threads", str(threads), "--retry-s", "120"]
    logs = [(folder / f"{name}-{runtime}.log").open("wb") for name in ("server", "client")]
    processes = [
        subprocess.Popen([sys.executable, "-c", LAUNCH.format(argv=server)], stdout=logs[0], stderr=logs[0]),
        subprocess.Popen(
            [sys.executable, "-c", (ABSENT if runtime == "ort" else "") + LAUNCH.format(argv=client)],
            stdout=logs[1],
            stderr=logs[1],
            cwd=ROOT,
        ),
    ]
    rss = 0
    try:
        while processes[1].poll() is None:
            rss = max(rss, peak_rss_kib(processes[1].pid))
            time.sleep(0.1)
        codes = [processes[0].wait(timeout=120), processes[1].returncode]
    finally:
        for process in processes:
            process.kill()
        for log in logs:
            log.close()
    if codes != [0, 0]:
        raise RuntimeError(
            f"{runtime}: exit {codes}\n" + (folder / f"client-{runtime}.log").read_text()[-2000:]
        )
    rows = read_metrics(out / "metrics.jsonl")[1:]
    step_s = [row.client_train_s[0] / row.client_steps[0] for row in rows[1:]]
    return {"step_s": step_s, "rss_kib": rss, "setup_down": rows[0].client_bytes[0][0], "run": out}


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


def extra_roots(extra: str) -> list[str]:
    """The distributions edgefed's `extra` adds, by name, as this platform resolves their markers."""
    from packaging.markers import Marker

    roots = []
    for requirement in metadata.requires("edgefed") or []:
        name, _, marker = requirement.partition(";")
        if f'extra == "{extra}"' in marker and Marker(marker).evaluate({"extra": extra}):
            roots.append(re.split(r"[ <>=!~\[(;]", name.strip(), maxsplit=1)[0])
    return roots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="federa", choices=("federa", "lora"))
    parser.add_argument("--steps", type=int, default=10, help="local steps of a round")
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds of each served run (the first warms up)"
    )
    parser.add_argument("--launches", type=int, default=2, help="served runs per runtime, in turn")
    parser.add_argument("--threads", type=int, default=2, help="the client's CPU threads")
    parser.add_argument("--accuracy", action="store_true", help="also the demo, torch-only against mixed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        # In turn, ORT then torch: a slow spell of this machine hits both.
        launches = {"ort": [], "torch": []}
        for _ in range(args.launches):
            for runtime in launches:
                launches[runtime].append(
                    served_client(runtime, folder, args.method, args.steps, args.rounds, args.threads)
                )
                print(f"measured a served {runtime} client", file=sys.stderr)
        artifacts = launches["ort"][0]["run"] / "ort"
        sizes = {path.name: path.stat().st_size for path in artifacts.iterdir() if path.suffix != ".log"}
    step = {
        name: statistics.median(s for run in runs for s in run["step_s"]) for name, runs in launches.items()
    }
    rss = {name: max(run["rss_kib"] for run in runs) / 1024 for name, runs in launches.items()}
    setup = {name: runs[0]["setup_down"] / 1e6 for name, runs in launches.items()}
    installed = {name: closure_bytes(["edgefed", *extra_roots(name)]) for name in launches}
    torch_version = metadata.version("torch")
    lines = [
        f"`python benchmarks/ort_runtime.py --method {args.method}{' --accuracy' * args.accuracy}` on "
        f"{platform.machine()} (clients on {args.threads} threads), torch {torch_version}, "
        f"onnxruntime-training-cpu {metadata.version('onnxruntime-training-cpu')}.",
        "",
        f"## `edgefed client` on each runtime: {args.method} on all-MiniLM-L6-v2 over loopback gRPC, "
        f"batch 16, 64 tokens, {args.steps} steps a round",
        "",
        "| | torch | ONNX Runtime | ORT / torch |",
        "|---|---:|---:|---:|",
        f"| s per local step (median of rounds 2-{args.rounds} of {args.launches} runs each) | "
        f"{step['torch']:.3f} | {step['ort']:.3f} | {step['ort'] / step['torch']:.2f} |",
        f"| peak RSS of the client process, MB | {rss['torch']:.0f} | {rss['ort']:.0f} | "
        f"{rss['ort'] / rss['torch']:.2f} |",
        f"| installed size of the client's dependencies, MB | {installed['torch'][0] / 1e6:.0f} | "
        f"{installed['ort'][0] / 1e6:.0f} | {installed['ort'][0] / installed['torch'][0]:.2f} |",
        f"| setup download (the ORT client's: artifacts, tokenizer, manifest), MB | {setup['torch']:.2f} | "
        f"{setup['ort']:.1f} | |",
        "",
        "The ORT client ran with torch and transformers marked absent. Its runtime files, made once per run "
        "by the server: "
        + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(sizes.items()))
        + ".",
        "",
        f"Installed for `edgefed[torch]`: {', '.join(installed['torch'][1])}.",
        f"For `edgefed[ort]`: {', '.join(installed['ort'][1])}.",
    ]
    if args.accuracy:
        lines += [
            "",
            "## The demo (FeDeRA, 4 clients, 16 rounds): every client on torch, or every other on ORT",
            "",
            "In process, an ORT client draws the batches a torch client would; as a process over gRPC it is "
            "the device runtime, with its own tokeniser (the same tokens) and numpy's batch order.",
            "",
        ]
        lines += accuracy_rows()
    publish(lines, args.out)


def accuracy_rows() -> list[str]:
    from edgefed.components import resolve_config
    from edgefed.federation.runner import run

    rows = ["| clients | final accuracy | best accuracy | wall s |", "|---|---:|---:|---:|"]
    for label, runtimes, transport in (
        ("all torch, in process", "torch", "inproc"),
        ("torch and ORT in turn, in process", "torch,ort", "inproc"),
        ("torch and ORT in turn, client processes over gRPC", "torch,ort", "grpc"),
    ):
        name = f"ort-demo-{transport}-{runtimes.replace(',', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
        settings = {"client_runtime": runtimes, "transport": transport, "out": str(ROOT / "runs" / name)}
        summary = run(resolve_config(None, settings), echo=lambda line: None)
        rows.append(
            f"| {label} | {summary.final_accuracy:.4f} | {summary.best_accuracy:.4f} | {summary.wall_s:.0f} |"
        )
        print(f"ran the demo: {label}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
