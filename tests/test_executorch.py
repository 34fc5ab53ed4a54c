"""ExecuTorch as a client's training runtime: a training program made from the run's model, a local round
that takes the torch round's steps, and a federation mixing both runtimes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("executorch.extension.training", reason="needs executorch (edgefed[executorch])")

from edgefed.components import resolve_config
from edgefed.errors import EdgefedError
from edgefed.et.local import EtLocalTrainer
from edgefed.et.program import training_program
from edgefed.methods import trainable_state
from tests.adapter_runtimes import MIXED_RUN_TERMS, float64_round, perturbed, run_metrics, worker_and_examples
from tests.tiny import HIDDEN
from tests.tolerance import assert_as_accurate_in_norm, assert_runs_agree

SEQ_LEN = 32  # worker_and_examples encodes to 32 tokens


@pytest.mark.parametrize("method", ["lora", "federa"])
def test_an_executorch_round_takes_the_steps_of_a_torch_round(still_model_dir, small_data_dir, method):
    """Same global state, same batches (padded to the program's shape): the ExecuTorch client's delta is
    the torch client's (AdamW with clipping, as edgefed's LocalTrainer runs it), to float error."""
    config, worker, examples = worker_and_examples(still_model_dir, small_data_dir, method)
    trainable = list(trainable_state(worker.model))
    program = training_program(worker.model, trainable, 8, SEQ_LEN)
    global_state = perturbed(trainable_state(worker.model))
    et = EtLocalTrainer(program, trainable, worker.trainer.lr, 8, SEQ_LEN, 0, config.max_grad_norm)
    et_losses, torch_losses = [], []
    # 7 steps over 400 examples in batches of 8: every batch full; the padding of the last row of the
    # token dimension is what the program adds.
    ours = et.fit(0, global_state, examples, 7, seed=3, on_step=et_losses.append)
    theirs = worker.trainer.fit(0, global_state, examples, 7, seed=3, on_step=torch_losses.append)
    exact, exact_losses = float64_round(worker, global_state, examples, 7, seed=3)
    assert max(float(t.abs().max()) for t in theirs.delta.values()) > 0.01  # the round moved the adapters
    # ExecuTorch's float32 round is as accurate as torch's against torch's float64 round.
    assert_as_accurate_in_norm(et_losses, torch_losses, exact_losses, "losses", terms=HIDDEN)
    assert_as_accurate_in_norm(ours.delta, theirs.delta, exact.delta, "delta", terms=HIDDEN)
    assert (ours.num_examples, ours.steps) == (theirs.num_examples, theirs.steps)
    # A second round from the same state computes the same: nothing of the first stays in the program.
    again = et.fit(0, global_state, examples, 7, seed=3)
    for name in trainable:
        assert torch.equal(again.delta[name], ours.delta[name]), name


def test_padding_rows_add_nothing(still_model_dir, small_data_dir):
    """A partial batch (the last of an epoch) is padded with rows the loss ignores: its gradients are
    the unpadded batch's."""
    _, worker, examples = worker_and_examples(still_model_dir, small_data_dir, "lora")
    trainable = list(trainable_state(worker.model))
    state = perturbed(trainable_state(worker.model))
    few = examples.subset(list(range(5)))  # one batch of 5 rows where the program takes 8
    full = EtLocalTrainer(
        training_program(worker.model, trainable, 8, SEQ_LEN), trainable, 0.01, 8, SEQ_LEN, 0, 1.0
    )
    exact = EtLocalTrainer(
        training_program(worker.model, trainable, 5, SEQ_LEN), trainable, 0.01, 5, SEQ_LEN, 0, 1.0
    )
    ours, theirs = full.fit(0, state, few, 1, seed=1), exact.fit(0, state, few, 1, seed=1)
    # Both as accurate as torch's float32 step on the 5 rows, against its float64 step.
    worker.trainer.lr, worker.trainer.max_grad_norm = 0.01, 1.0
    torch_step = worker.trainer.fit(0, state, few, 1, seed=1)
    torch_exact, _ = float64_round(worker, state, few, 1, seed=1)
    for got in (ours, theirs):
        assert_as_accurate_in_norm(
            [got.train_loss], [torch_step.train_loss], [torch_exact.train_loss], "loss", terms=HIDDEN
        )
        assert_as_accurate_in_norm(got.delta, torch_step.delta, torch_exact.delta, "delta", terms=HIDDEN)


def test_a_federation_of_torch_and_executorch_clients_computes_the_torch_one(
    still_model_dir, small_data_dir, tmp_path
):
    from edgefed.federation.runner import run

    common = {
        "model": str(still_model_dir), "data": str(small_data_dir), "clients": 2, "rounds": 3,
        "local_steps": 4, "batch_size": 8, "max_seq_len": 32, "method": "federa", "lr": 0.01,
    }  # fmt: skip
    for name, runtimes in (("torch", "torch"), ("mixed", "torch,executorch")):
        config = resolve_config(None, {**common, "client_runtime": runtimes, "out": str(tmp_path / name)})
        run(config, echo=lambda line: None)
    assert (tmp_path / "mixed" / "executorch" / "train.pte").is_file()
    for ours, theirs in zip(run_metrics(tmp_path / "mixed"), run_metrics(tmp_path / "torch"), strict=True):
        # A count, not a float: one decision of the 100 may flip where its margin is within rounding.
        assert round(abs(ours["accuracy"] - theirs["accuracy"]) * 100) <= 1
        assert_runs_agree(ours["loss"], theirs["loss"], MIXED_RUN_TERMS, f"round {ours['round']}")
        assert ours["bytes_up"] == theirs["bytes_up"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"method": "bitfit"}, "client-runtime executorch trains lora and federa classifiers, not bitfit"),
        ({"transport": "grpc"}, "client-runtime executorch runs in-process clients"),
    ],
)
def test_what_the_executorch_runtime_does_not_do_is_one_clear_error(small_data_dir, overrides, expected):
    with pytest.raises(EdgefedError) as error:
        resolve_config(None, {"data": str(small_data_dir), "client_runtime": "executorch", **overrides})
    assert expected in str(error.value)


def test_without_executorch_the_runtime_is_one_line_that_says_why(small_data_dir):
    script = (
        "import sys\nsys.modules['executorch'] = None\nfrom edgefed.cli import main\n"
        f"sys.exit(main(['run', '--data', {str(small_data_dir)!r}, '--client-runtime', 'executorch']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edgefed[executorch]'" in lines[0], lines
