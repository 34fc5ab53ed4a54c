"""The ort runtime of `edgefed client --runtime ort`: a device trains with numpy, onnxruntime-training and
the `tokenizers` package alone, no torch, no transformers (tests/test_ort.py runs it with both made
unimportable, and the import contracts in pyproject.toml forbid them here).

At setup the device fetches the run's runtime files (`FetchRuntime`): the ONNX Runtime training
artifacts that the server made once of its model with adapters (FeDeRA's residual base is in their
checkpoint), the model's tokenizer.json, and a manifest of the run's training settings. It tokenises
its data as the torch client does (truncated to the run's length, each batch padded to its longest
sequence) and trains each round through OrtTrainer, which takes torch's AdamW steps. Its batch order
comes from numpy's generator seeded per run, round and client: the same kind of stream as a torch
client's, not the same draws. Its delta goes up uncompressed (codec none).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgefed.data.rounds import client_round_seed, local_steps
from edgefed.data.splits import load_train
from edgefed.errors import EdgefedError
from edgefed.ort import require_onnxruntime_training
from edgefed.ort.arrays import ARRAYS, files_of, parse_arrays
from edgefed.ort.trainer import ARTIFACT_FILES, OrtTrainer, UpdateRule
from edgefed.wire.device import DeviceLink
from edgefed.wire.framing import Expected, Received
from edgefed.wire.sending import EncodedUpdate, serialize_state
from edgefed.wire.v1 import federation_pb2 as pb

MANIFEST, TOKENIZER = "manifest.json", "tokenizer.json"
MANIFEST_FORMAT = 1
# The runtime files hold every weight of the model (all-MiniLM-L6-v2: 93 MB; BERT-base: about 440 MB).
MAX_RUNTIME_BYTES = 2 << 30


@dataclass(frozen=True)
class Manifest:
    """What a device needs of the run to train it (the server writes it from the run's configuration)."""

    trainable: dict[str, list[int]]  # the adapter tensors the artifacts train: name -> shape
    lr: float
    max_grad_norm: float | None
    batch_size: int
    local_steps: int | None
    local_epochs: float | None
    max_seq_len: int
    seed: int
    chunk_bytes: int
    pad_id: int
    format: int = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            values = json.loads(data)
            if values.get("format") != MANIFEST_FORMAT:
                raise EdgefedError(
                    f"the server's runtime manifest is format {values.get('format')}; this edgefed reads "
                    f"{MANIFEST_FORMAT} (install the server's edgefed version)"
                )
            return cls(**values)
        except (ValueError, TypeError, AttributeError) as error:
            raise EdgefedError(f"the server's runtime manifest is unreadable ({error})") from None


class OrtDevice:
    def __init__(self, link: DeviceLink, threads: int | None = None) -> None:
        require_onnxruntime_training()  # where it cannot load: one clear line, before connecting
        self.link = link
        self.threads = threads
        self.folder = tempfile.TemporaryDirectory(prefix="edgefed-ort-")  # removed with the client

    def build(self, joined: pb.JoinReply) -> None:
        link = self.link
        expected = Expected(link.run_id, 0, None, link.client_id, MAX_RUNTIME_BYTES)
        files = files_of(link.fetch("FetchRuntime", MAX_RUNTIME_BYTES), expected)
        missing = sorted({MANIFEST, TOKENIZER, *ARTIFACT_FILES} - set(files))
        if missing:
            raise EdgefedError(f"the server's runtime files lack {', '.join(missing)}")
        manifest = Manifest.from_json(bytes(files[MANIFEST]))
        folder = Path(self.folder.name)
        for name in ARTIFACT_FILES:
            (folder / name).write_bytes(files[name])
        self.input_ids, self.labels = encode_texts(link.data, bytes(files[TOKENIZER]), manifest.max_seq_len)
        link.declare(len(self.labels))
        self.manifest = manifest
        self.shapes = {name: (tuple(shape), "float32") for name, shape in manifest.trainable.items()}
        self.chunk_bytes = manifest.chunk_bytes
        self.steps = local_steps(
            len(self.labels), manifest.batch_size, manifest.local_steps, manifest.local_epochs
        )
        rule = UpdateRule(manifest.lr, "adamw", manifest.max_grad_norm or None)
        self.trainer = OrtTrainer(folder, list(manifest.trainable), rule, self.threads)
        self.client_index = joined.client_index
        link.echo(
            f"edgefed: {link.client_id} is client {joined.client_index} of run {link.run_id}: ONNX Runtime, "
            f"{len(manifest.trainable)} adapter tensors on {len(self.labels):,} examples from "
            f"{Path(link.data).name}, {self.steps} local steps, cpu"
        )

    def fit(self, round_number: int, payload: Received) -> EncodedUpdate:
        state = parse_arrays(
            payload, Expected(self.link.run_id, round_number, self.shapes, self.link.client_id)
        )
        seed = client_round_seed(self.manifest.seed, round_number, self.client_index)
        batches = self._batches(np.random.default_rng(seed))
        try:
            trained = self.trainer.fit(state, batches)
        except FloatingPointError as error:
            raise EdgefedError(f"{self.link.client_id}: {error}") from None
        payload_bytes = serialize_state(ARRAYS.encode(name, delta) for name, delta in trained.delta.items())
        loss = sum(trained.losses) / len(trained.losses)
        return EncodedUpdate(payload_bytes, len(self.labels), loss, len(trained.losses), trained.seconds)

    def _batches(self, generator: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        """`steps` padded batches, walking through fresh permutations (epochs) as often as needed."""
        size, produced = self.manifest.batch_size, 0
        while True:
            order = generator.permutation(len(self.labels))
            for start in range(0, len(order), size):
                if produced == self.steps:
                    return
                rows = order[start : start + size]
                batch = padded_batch([self.input_ids[i] for i in rows], self.manifest.pad_id)
                yield batch | {"labels": np.array([self.labels[i] for i in rows], dtype=np.int64)}
                produced += 1


def encode_texts(data: str, tokenizer_json: bytes, max_seq_len: int) -> tuple[list[list[int]], list[int]]:
    """The client's examples tokenised as the torch client's tokenizer does: truncated to `max_seq_len`
    tokens, special tokens included, not padded."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json.decode())
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_seq_len)
    texts = load_train(data)
    return [encoding.ids for encoding in tokenizer.encode_batch(texts.texts)], list(texts.labels)


def padded_batch(sequences: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    width = max(len(sequence) for sequence in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
