"""ONNX Runtime as a client's training runtime: artifacts made from the run's model, a local round that
takes the torch round's steps, a device trainer without torch, and federations mixing both runtimes.

The tiny BERT here has no dropout: the exported graph has none (edgefed/ort/artifacts.py), and with it
a torch round and an ORT round see the same function."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime.training", reason="needs onnxruntime-training (edgefed[ort])")

from edgefed.components import resolve_config
from edgefed.data import shuffled_batches
from edgefed.errors import EdgefedError
from edgefed.methods import trainable_state
from edgefed.models import load_tokenizer
from edgefed.ort.artifacts import write_artifacts
from edgefed.ort.local import OrtLocalTrainer, graph_inputs
from edgefed.ort.trainer import OrtTrainer, UpdateRule
from tests.adapter_runtimes import MIXED_RUN_TERMS, float64_round, perturbed, run_metrics, worker_and_examples
from tests.tiny import HIDDEN
from tests.tolerance import assert_as_accurate, assert_as_accurate_in_norm, assert_runs_agree

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["lora", "federa"])
def test_an_ort_round_takes_the_steps_of_a_torch_round(still_model_dir, small_data_dir, tmp_path, method):
    """Same global state, same batches: the ORT client's delta is the torch client's (AdamW with
    clipping, as edgefed's LocalTrainer runs it), to float error."""
    config, worker, examples = worker_and_examples(still_model_dir, small_data_dir, method)
    trainable = list(trainable_state(worker.model))
    files = write_artifacts(worker.model, trainable, tmp_path / "ort")
    assert set(files) == {"training_model.onnx", "eval_model.onnx", "checkpoint"}
    global_state = perturbed(trainable_state(worker.model))
    ort = OrtLocalTrainer(tmp_path / "ort", trainable, worker.trainer.lr, 8, config.max_grad_norm)
    ort_losses, torch_losses = [], []
    ours = ort.fit(0, global_state, examples, 6, seed=3, on_step=ort_losses.append)
    theirs = worker.trainer.fit(0, global_state, examples, 6, seed=3, on_step=torch_losses.append)
    exact, exact_losses = float64_round(worker, global_state, examples, 6, seed=3)
    scale = max(float(t.abs().max()) for t in theirs.delta.values())
    assert scale > 0.01  # the round moved the adapters
    # ORT's float32 round is as accurate as torch's against torch's float64 round.
    assert_as_accurate_in_norm(ort_losses, torch_losses, exact_losses, "losses", terms=HIDDEN)
    assert_as_accurate_in_norm(ours.delta, theirs.delta, exact.delta, "delta", terms=HIDDEN)
    assert (ours.num_examples, ours.steps) == (theirs.num_examples, theirs.steps)


def exported_round(model_dir: Path, data_dir: Path, method: str, folder: Path, steps: int):
    """A worker, the artifacts of its model in folder/ort, a perturbed global state and `steps` batches."""
    _, worker, examples = worker_and_examples(model_dir, data_dir, method)
    trainable = list(trainable_state(worker.model))
    write_artifacts(worker.model, trainable, folder / "ort")
    generator = torch.Generator().manual_seed(11)
    batches = [
        examples.batch(indices, generator) for indices in shuffled_batches(len(examples), 8, steps, generator)
    ]
    return worker, trainable, perturbed(trainable_state(worker.model)), batches


def test_sgd_through_ort_is_torch_sgd_to_float_error(still_model_dir, small_data_dir, tmp_path):
    worker, trainable, global_state, batches = exported_round(
        still_model_dir, small_data_dir, "lora", tmp_path, 4
    )
    trained = OrtTrainer(tmp_path / "ort", trainable, UpdateRule(0.05, "sgd", None)).fit(
        {name: t.numpy() for name, t in global_state.items()}, [graph_inputs(b) for b in batches]
    )
    deltas = {}
    for dtype in (torch.float32, torch.float64):  # torch's SGD, and its float64 reference
        model = worker.model.to(dtype)
        model.load_state_dict(global_state, strict=False)
        params = dict(model.named_parameters())
        sgd = torch.optim.SGD([params[name] for name in trainable], lr=0.05)
        model.train()
        for batch in batches:
            model(**batch).loss.backward()
            sgd.step()
            sgd.zero_grad()
        deltas[dtype] = {name: params[name].detach() - global_state[name].to(dtype) for name in trainable}
    assert_as_accurate_in_norm(trained.delta, deltas[torch.float32], deltas[torch.float64], terms=HIDDEN)


BLOCKER = """
import sys
for absent in ("torch", "transformers"):
    sys.modules[absent] = None  # as if not installed: importing it fails, find_spec finds nothing
"""


def test_the_device_trainer_runs_without_torch_or_transformers(still_model_dir, small_data_dir, tmp_path):
    """A process where torch and transformers cannot be imported trains a round from the artifacts
    and numpy batches, and gets the delta the test process's torch round gets."""
    worker, trainable, global_state, batches = exported_round(
        still_model_dir, small_data_dir, "federa", tmp_path, 3
    )
    batches = [graph_inputs(batch) for batch in batches]
    np.savez(tmp_path / "state.npz", **{name: t.numpy() for name, t in global_state.items()})
    np.savez(tmp_path / "batches.npz", **{f"{k}:{n}": b[n] for k, b in enumerate(batches) for n in b})
    script = (
        BLOCKER
        + f"""
import json, numpy as np
from pathlib import Path
from edgefed.ort.trainer import OrtTrainer, UpdateRule
folder = Path({str(tmp_path)!r})
state = dict(np.load(folder / "state.npz"))
packed = np.load(folder / "batches.npz")
batches = [{{n.split(":")[1]: packed[n] for n in packed.files if n.startswith(f"{{k}}:")}} for k in range(3)]
trainer = OrtTrainer(folder / "ort", {trainable!r}, UpdateRule({worker.trainer.lr}, "adamw", 1.0))
trained = trainer.fit(state, batches)
np.savez(folder / "delta.npz", **trained.delta)
loaded = [m for m, module in sys.modules.items() if module is not None]
print(json.dumps(sorted(m for m in loaded if m.split(".")[0] in ("torch", "transformers"))))
"""
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    delta = dict(np.load(tmp_path / "delta.npz"))
    # The same trainer in this process, where torch is loaded (the round test ties it to torch's round).
    here = OrtTrainer(tmp_path / "ort", trainable, UpdateRule(worker.trainer.lr, "adamw", 1.0)).fit(
        {name: t.numpy() for name, t in global_state.items()}, batches
    )
    for name in trainable:
        np.testing.assert_array_equal(delta[name], here.delta[name])


def test_a_federation_of_torch_and_ort_clients_computes_the_torch_one(
    still_model_dir, small_data_dir, tmp_path
):
    from edgefed.federation.runner import run

    common = {
        "model": str(still_model_dir), "data": str(small_data_dir), "clients": 2, "rounds": 3,
        "local_steps": 4, "batch_size": 8, "max_seq_len": 32, "method": "federa", "lr": 0.01,
    }  # fmt: skip
    for name, runtimes in (("torch", "torch"), ("mixed", "torch,ort"), ("ort", "ort")):
        config = resolve_config(None, {**common, "client_runtime": runtimes, "out": str(tmp_path / name)})
        run(config, echo=lambda line: None)
    assert (tmp_path / "mixed" / "ort" / "training_model.onnx").is_file()
    torch_rows = run_metrics(tmp_path / "torch")
    for name in ("mixed", "ort"):
        for ours, theirs in zip(run_metrics(tmp_path / name), torch_rows, strict=True):
            # A count, not a float: one decision of the 100 may flip where its margin is within rounding.
            assert round(abs(ours["accuracy"] - theirs["accuracy"]) * 100) <= 1
            assert_runs_agree(ours["loss"], theirs["loss"], MIXED_RUN_TERMS, f"round {ours['round']}")
            assert ours["bytes_up"] == theirs["bytes_up"]


def test_a_loopback_fleet_runs_ort_client_processes_beside_torch_ones(
    still_model_dir, small_data_dir, tmp_path
):
    """`edgefed run --transport grpc --client-runtime torch,ort`: every other client process trains
    through ONNX Runtime, fetching the runtime files the server makes once."""
    from edgefed.federation.runner import run

    settings = {
        "model": str(still_model_dir), "data": str(small_data_dir), "clients": 2, "rounds": 2,
        "local_steps": 3, "batch_size": 8, "max_seq_len": 32, "method": "lora", "lr": 0.01,
        "transport": "grpc", "client_runtime": "torch,ort", "out": str(tmp_path / "run"),
    }  # fmt: skip
    run(resolve_config(None, settings), echo=lambda line: None)
    rows = run_metrics(tmp_path / "run")
    assert [row["clients"] for row in rows] == [[], [0, 1], [0, 1]]
    logs = [(tmp_path / "run" / "clients" / f"client-{index}.log").read_text() for index in (0, 1)]
    assert "ONNX Runtime" not in logs[0] and "ONNX Runtime, " in logs[1], logs


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"method": "fft"}, "client-runtime ort trains lora and federa classifiers, not fft"),
        ({"transport": "flower"}, "client-runtime ort runs in-process clients or client processes"),
        ({"transport": "grpc", "codec": "int8"}, "ort client processes send uncompressed deltas"),
        ({"client_runtime": "torch,tensorflow"}, "unknown client-runtime ['tensorflow']"),
    ],
)
def test_what_the_ort_runtime_does_not_do_is_one_clear_error(small_data_dir, overrides, expected):
    with pytest.raises(EdgefedError) as error:
        resolve_config(None, {"data": str(small_data_dir), "client_runtime": "ort", **overrides})
    assert expected in str(error.value)


def test_without_onnxruntime_training_the_ort_runtime_is_one_line_that_says_why(small_data_dir):
    script = BLOCKER.replace('("torch", "transformers")', '("onnxruntime",)') + (
        "from edgefed.cli import main\n"
        f"sys.exit(main(['run', '--data', {str(small_data_dir)!r}, '--client-runtime', 'ort']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edgefed[ort]'" in lines[0] and "x86-64 Linux" in lines[0]


@pytest.mark.parametrize(
    ("method", "outputs"), [("federa", ["logits"]), ("ee-adapter", ["exit_1", "exit_2"])]
)
def test_an_exported_run_answers_in_onnx_runtime_as_in_torch(
    tiny_model_dir, small_data_dir, tmp_path, method, outputs
):
    """`edgefed export --onnx RUN`: ONNX Runtime's inference session gives torch's answers on texts
    the export never saw, at other batch sizes and lengths; an early-exit run has every exit."""
    import onnxruntime

    from edgefed.cli import main
    from edgefed.setup import load_trained
    from tests.test_run import tiny_run

    run_dir = tiny_run(tmp_path, tiny_model_dir, small_data_dir, method=method, rounds=1)
    assert main(["export", "--onnx", str(run_dir)]) == 0
    session = onnxruntime.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == outputs
    model = load_trained(run_dir).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = [
        "a gripping , funny film",
        "dull",
        "it never quite finds its footing , but the cast is a joy to watch",
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=True)
    answers = session.run(
        outputs, {name: batch[name].numpy() for name in ("input_ids", "attention_mask", "token_type_ids")}
    )
    with torch.no_grad():
        result, exact = model(**batch), copy.deepcopy(model).double()(**batch)
    expected = result.exit_logits if method == "ee-adapter" else (result.logits,)
    expected64 = exact.exit_logits if method == "ee-adapter" else (exact.logits,)
    for ours, theirs, theirs64 in zip(answers, expected, expected64, strict=True):
        assert_as_accurate(torch.from_numpy(ours), theirs, theirs64, "ONNX logits", terms=HIDDEN)


def test_export_of_an_unfinished_run_is_one_clear_error(tmp_path, capsys):
    from edgefed.cli import main

    assert main(["export", "--onnx", str(tmp_path)]) == 2
    assert "no summary.json; the run did not finish" in capsys.readouterr().err


def test_a_device_tokenises_with_tokenizers_as_the_torch_client_does_with_transformers(
    still_model_dir, small_data_dir
):
    from edgefed.data import encode
    from edgefed.data.splits import load_train
    from edgefed.ort.device import encode_texts

    tokenizer = load_tokenizer(str(still_model_dir))
    ids, labels = encode_texts(
        str(small_data_dir), tokenizer.backend_tokenizer.to_str().encode(), max_seq_len=12
    )
    theirs = encode(load_train(small_data_dir), tokenizer, 12)  # the torch client's data and encoding
    assert ids == theirs.input_ids and labels == theirs.labels
    assert max(len(row) for row in ids) == 12 and min(len(row) for row in ids) < 12


def serve_with_clients(model_dir: Path, data_dir: Path, folder: Path, method: str, runtimes: list[str]):
    """`edgefed server` and one `edgefed client` process per runtime; an ort client runs where torch and
    transformers cannot be imported. Returns the exit statuses (the server's first: None when a client
    failed, and the server was stopped) and every process's log."""
    from tests.test_transport import free_port

    address = f"127.0.0.1:{free_port()}"
    flags = {
        "model": model_dir, "data": data_dir, "clients": len(runtimes), "rounds": 2, "local_steps": 3,
        "batch_size": 8, "max_seq_len": 32, "method": method, "lr": 0.01, "out": folder / "run",
    }  # fmt: skip
    argv = ["server", "--address", address]
    argv += [item for key, value in flags.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    logs = {name: (folder / f"{name}.log").open("wb") for name in ["server", *map(str, range(len(runtimes)))]}
    launch = "import sys\nfrom edgefed.cli import main\nsys.exit(main({argv!r}))\n"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", launch.format(argv=argv)], stdout=logs["server"], stderr=subprocess.STDOUT
        )
    ]
    try:
        for index, runtime in enumerate(runtimes):
            client = ["client", "--server", address, "--data", str(data_dir), "--name", f"client-{index}"]
            client += ["--runtime", runtime, "--threads", "1", "--retry-s", "60"]
            client += ["--model", str(model_dir)] if runtime != "ort" else []  # the server names no path
            script = (BLOCKER if runtime == "ort" else "") + launch.format(argv=client)
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", script],
                    stdout=logs[str(index)],
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            )
        codes = [process.wait(timeout=300) for process in processes[1:]]
        # The server finishes when its clients did; after a refused one it would wait for another.
        codes.insert(0, processes[0].wait(timeout=120) if not any(codes) else None)
    finally:
        for process in processes:
            process.kill()
        for log in logs.values():
            log.close()
    return codes, {name: (folder / f"{name}.log").read_text() for name in logs}


@pytest.mark.parametrize("method", ["lora", "federa"])
def test_an_ort_device_without_torch_trains_over_grpc_beside_a_torch_one(
    still_model_dir, small_data_dir, tmp_path, method
):
    """`edgefed client --runtime ort` in a process where torch and transformers cannot be imported
    fetches the run's artifacts, tokenizer and manifest at setup, trains every round and pushes deltas
    the server takes; a torch client trains the same run."""
    codes, logs = serve_with_clients(still_model_dir, small_data_dir, tmp_path, method, ["ort", "torch"])
    assert codes == [0, 0, 0], logs
    assert re.search(r"client-0 joined as client \d, runtime ort", logs["server"]), logs["server"]
    assert "ONNX Runtime, " in logs["0"] and "round 2: 3 steps" in logs["0"], logs["0"]
    rows = run_metrics(tmp_path / "run")
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients"] == [0, 1] for row in rows[1:]), rows  # both clients' updates were aggregated
    # The ort device's setup download (its runtime files) is counted: far more than the torch client's.
    setup, torch_setup = sorted(down for down, _ in rows[1]["client_bytes"])[::-1]
    assert setup > 100 * torch_setup


def test_a_run_ort_devices_cannot_train_refuses_them_at_join_in_one_line(
    still_model_dir, small_data_dir, tmp_path
):
    codes, logs = serve_with_clients(still_model_dir, small_data_dir, tmp_path, "fft", ["ort"])
    assert codes[1] == 2 and "Traceback" not in logs["0"], logs["0"]
    assert (
        logs["0"]
        .strip()
        .splitlines()[-1]
        .endswith("runtime ort: ort trains lora and federa classifiers, not fft (classification)")
    ), logs["0"]


def test_a_device_without_onnxruntime_training_asking_for_ort_gets_one_line(small_data_dir):
    script = BLOCKER.replace('("torch", "transformers")', '("onnxruntime",)') + (
        "from edgefed.cli import main\n"
        f"sys.exit(main(['client', '--server', '127.0.0.1:9', '--data', {str(small_data_dir)!r}, "
        "'--runtime', 'ort']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "pip install 'edgefed[ort]'" in lines[0] and "use the torch runtime" in lines[0]
    )


def test_without_the_torch_extra_a_command_that_needs_it_says_so_in_one_line(small_data_dir):
    script = BLOCKER + (
        "from edgefed.cli import main\n"
        f"sys.exit(main(['run', '--data', {str(small_data_dir)!r}, '--rounds', '1']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edgefed[torch]'" in lines[0], lines


@pytest.mark.parametrize(
    ("text", "expected"),
    [(b"{", "unreadable"), (b'{"format": 2}', "format 2"), (b'{"format": 1, "lr": 1}', "unreadable")],
)
def test_a_bad_runtime_manifest_is_one_clear_error(text, expected):
    from edgefed.ort.device import Manifest

    with pytest.raises(EdgefedError, match=expected):
        Manifest.from_json(text)
