"""The executorch runtime: in-process clients train the run's adapters through an ExecuTorch training
program the server makes once per run (<run>/executorch/train.pte). This module imports neither torch
nor executorch until a method needs them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgefed.et import require_executorch
from edgefed.runtimes import Runtime, RuntimeBuild, Trainer, adapter_refusal

if TYPE_CHECKING:
    from edgefed.config import RunConfig

PROGRAM = "train.pte"


class ExecuTorchRuntime(Runtime):
    name = "executorch"
    transports = ("inproc",)
    where = "in-process clients"

    def refusal(self, config: RunConfig, task: str) -> str | None:
        return adapter_refusal(self.name, config, task)

    def require(self) -> None:
        require_executorch()

    def trainer(self, build: RuntimeBuild) -> Trainer:
        from edgefed.et.local import EtLocalTrainer
        from edgefed.et.program import training_program
        from edgefed.methods import trainable_state

        config = build.config
        trainable = list(trainable_state(build.model))
        program = training_program(build.model, trainable, config.batch_size, config.max_seq_len)
        build.folder.mkdir(parents=True, exist_ok=True)
        (build.folder / PROGRAM).write_bytes(program)
        return EtLocalTrainer(
            program,
            trainable,
            build.lr,
            config.batch_size,
            config.max_seq_len,
            build.pad_id,
            config.max_grad_norm,
        )
