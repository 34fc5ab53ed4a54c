"""Anytime inference: a trained run answers on a device within a latency budget.

An early-exit model (`ee-adapter`) can stop after any block and still predict. Given a device profile
and a latency budget, the predictor runs the deepest exit whose predicted latency on that profile fits
the budget; with a confidence threshold it stops at the first exit, up to that depth, whose top class
probability reaches it (the blocks beyond it never run). Latencies come from the cost model
(edgefed/devices/costmodel.py `inference_seconds`): SIMULATED, never measured on the device, for the
worst case the run allows (a text `max-seq-len` tokens long, alone in its batch). A model without
exits has one, after its last block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from edgefed.components import adapter_spec, method_of, resolve_config
from edgefed.devices.costmodel import ModelShape, inference_seconds
from edgefed.devices.profiles import load_profile
from edgefed.errors import EdgefedError
from edgefed.methods.ee_adapter import EarlyExitModel
from edgefed.models import default_device, load_tokenizer, resolve_model_path
from edgefed.setup import load_trained

BATCH_SIZE = 32


@dataclass(frozen=True)
class Prediction:
    label: int
    name: str  # the label's name where the run's data names its labels (labels.txt), else the number
    probability: float
    exit_layer: int  # the blocks that ran for this text
    latency_ms: float | None  # predicted on the profile (SIMULATED); None without a profile


class AnytimePredictor:
    def __init__(
        self,
        run_dir: str | Path,
        profile: str | None = None,
        latency_ms: float | None = None,
        confidence: float | None = None,
    ) -> None:
        if latency_ms is not None and profile is None:
            raise EdgefedError("a latency budget needs the device: give a profile")
        if latency_ms is not None and latency_ms <= 0:
            raise EdgefedError(f"the latency budget must be positive, got {latency_ms} ms")
        if confidence is not None and not 0 < confidence <= 1:
            raise EdgefedError(f"confidence is a probability in (0, 1], got {confidence}")
        run_dir = Path(run_dir)
        config = resolve_config(str(run_dir / "config.toml"), {})
        self.device = default_device()
        self.model = load_trained(run_dir).to(self.device).eval()
        self.tokenizer = load_tokenizer(resolve_model_path(config.model))
        self.seq_len = config.max_seq_len
        self.confidence = confidence
        self.names = label_names(config.data)
        self.early_exits = isinstance(self.model, EarlyExitModel)
        layers = self.model.num_layers if self.early_exits else self.model.config.num_hidden_layers
        frozen = [param for param in self.model.parameters() if not param.requires_grad]
        method = method_of(config)
        self.shape = ModelShape.of(
            self.model,
            frozen,
            [],
            adapter_spec(config, method, ()).rank,
            method.adapters_see_all_tokens,
            method.backward_through_blocks,
        )
        self.profile = load_profile(profile) if profile else None
        # Predicted latency of each exit on the profile (exit k: blocks 0..k-1); one exit without exits.
        exits = range(1, layers + 1) if self.early_exits else [layers]
        self.latencies_ms = {
            exit_layer: 1e3 * inference_seconds(self.shape, exit_layer, self.seq_len, self.profile)
            for exit_layer in exits
            if self.profile is not None
        }
        self.depth = self._deepest(exits, latency_ms)
        if self.early_exits:
            self.model.exit_layer = self.depth

    def _deepest(self, exits: Iterable[int], latency_ms: float | None) -> int:
        exits = list(exits)
        if latency_ms is None:
            return exits[-1]
        fitting = [exit_layer for exit_layer in exits if self.latencies_ms[exit_layer] <= latency_ms]
        if not fitting:
            first = exits[0]
            raise EdgefedError(
                f"no exit fits {latency_ms:g} ms on {self.profile.name}: the shallowest (after block "
                f"{first}) needs {self.latencies_ms[first]:.2f} ms (SIMULATED)"
            )
        return fitting[-1]

    @torch.no_grad()
    def predict(self, texts: Iterable[str]) -> Iterator[Prediction]:
        """One prediction per text, in order (texts are read and answered a batch at a time)."""
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == BATCH_SIZE:
                yield from self._predict_batch(batch)
                batch = []
        if batch:
            yield from self._predict_batch(batch)

    def _predict_batch(self, texts: list[str]) -> list[Prediction]:
        encoded = self.tokenizer(
            texts, truncation=True, max_length=self.seq_len, padding=True, return_tensors="pt"
        )
        output = self.model(**{key: value.to(self.device) for key, value in encoded.items()})
        exit_logits = output.exit_logits if self.early_exits else (output.logits,)
        exit_layers = range(1, self.depth + 1) if self.early_exits else [self.depth]
        probabilities = [logits.float().softmax(dim=-1).cpu() for logits in exit_logits]
        predictions = []
        for row in range(len(texts)):
            chosen = len(probabilities) - 1
            # The first exit sure enough: one text at a time, a device would run no block after it
            # (here the batch runs to the depth; earlier exits do not depend on later blocks).
            if self.confidence is not None:
                chosen = next(
                    (k for k, p in enumerate(probabilities) if p[row].max() >= self.confidence), chosen
                )
            probability, label = probabilities[chosen][row].max(dim=-1)
            exit_layer = exit_layers[chosen]
            predictions.append(
                Prediction(
                    label=int(label),
                    name=self.names.get(int(label), str(int(label))),
                    probability=float(probability),
                    exit_layer=exit_layer,
                    latency_ms=self.latencies_ms.get(exit_layer),
                )
            )
        return predictions


def label_names(data: str | None) -> dict[int, str]:
    """Label i's name from labels.txt beside the run's data (line i+1), where there is one."""
    if data is None:
        return {}
    folder = Path(data) if Path(data).is_dir() else Path(data).parent
    path = folder / "labels.txt"
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    return {index: name.strip() for index, name in enumerate(lines) if name.strip()}
