"""The ort runtime: clients train the run's adapters through ONNX Runtime training artifacts that the
server makes once per run, in process (`--client-runtime ort`) or on a device without torch
(`edgefed client --runtime ort`, edgefed/ort/device.py). This module imports neither torch nor
onnxruntime until a method needs them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgefed.errors import EdgefedError
from edgefed.ort import require_onnxruntime_training
from edgefed.runtimes import Runtime, RuntimeBuild, Trainer, adapter_refusal

if TYPE_CHECKING:
    from edgefed.config import RunConfig


class OrtRuntime(Runtime):
    name = "ort"
    transports = ("inproc", "grpc")
    where = "in-process clients or client processes"
    device = "edgefed.ort.device:OrtDevice"
    fetches_files = True

    def refusal(self, config: RunConfig, task: str) -> str | None:
        refusal = adapter_refusal(self.name, config, task)
        if refusal is None and config.transport == "grpc" and config.codec != "none":
            return f"{self.name} client processes send uncompressed deltas: codec none, not {config.codec}"
        return refusal

    def require(self) -> None:
        require_onnxruntime_training()

    def trainer(self, build: RuntimeBuild) -> Trainer:
        from edgefed.ort.local import OrtLocalTrainer

        shapes = self._artifacts(build)[0]
        config = build.config
        return OrtLocalTrainer(build.folder, list(shapes), build.lr, config.batch_size, config.max_grad_norm)

    def setup_files(self, build: RuntimeBuild) -> bytes:
        """The artifacts, the model's tokenizer.json and the manifest of the run's training settings, as
        one payload (what edgefed/ort/device.py reads)."""
        from edgefed.ort.arrays import files_payload
        from edgefed.ort.device import MANIFEST, TOKENIZER, Manifest

        config = build.config
        backend = getattr(build.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise EdgefedError(
                f"{config.model} has no fast tokenizer (tokenizer.json), which ort devices use"
            )
        shapes, files = self._artifacts(build)
        manifest = Manifest(
            trainable=shapes,
            lr=build.lr,
            max_grad_norm=config.max_grad_norm,
            batch_size=config.batch_size,
            local_steps=config.local_steps,
            local_epochs=config.local_epochs,
            max_seq_len=config.max_seq_len,
            seed=config.seed,
            chunk_bytes=config.chunk_bytes,
            pad_id=build.pad_id,
        )
        tokenizer_json = backend.to_str().encode()
        return files_payload(files | {TOKENIZER: tokenizer_json, MANIFEST: manifest.to_json()})

    @staticmethod
    def _artifacts(build: RuntimeBuild) -> tuple[dict[str, list[int]], dict[str, bytes]]:
        """The training artifacts of the model in the runtime's folder: the tensors they train (name ->
        shape), and the files by name."""
        from edgefed.methods import trainable_state
        from edgefed.ort.artifacts import write_artifacts

        shapes = {name: list(tensor.shape) for name, tensor in trainable_state(build.model).items()}
        return shapes, write_artifacts(build.model, list(shapes), build.folder)
