"""The methods' settings, one class per kind of method (peft's per-method configs), kept apart from
the methods' torch code so that `edgefed run --help` builds their flags without loading torch.

Their fields that name an `AdapterSpec` field (edgefed/types.py) shape the adapted model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgefed.errors import EdgefedError
from edgefed.settings import MAX_COUNT, Settings, check_at_most, check_positive, option
from edgefed.types import AdapterSpec

LAYER_RANGE = re.compile(r"layers:(\d+)(?:-(\d+))?")
SPLIT_STRATEGIES = ("sequential", "parallel")
# How FedBERT's activations and gradients travel (edgefed/split/wire.py): fp32 (exact), fp16, bf16, int8.
SPLIT_CODECS = ("none", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class LowRankSettings(Settings):
    """LoRA and FeDeRA: ΔW = (alpha / rank) · B · A on the target modules."""

    rank: int = option(AdapterSpec.rank, "LoRA/FeDeRA rank; adapters' bottleneck width")
    alpha: float = option(AdapterSpec.alpha, "LoRA/FeDeRA alpha; scale = alpha / rank")
    target_modules: tuple[str, ...] = option(
        (),
        "comma-separated module names that LoRA/FeDeRA adapt (default: the model's kind's: query,value "
        "on an encoder; q/k/v/o, gate, up and down projections on a decoder)",
        example="query,value",
    )
    fused_kernels: bool = option(
        True, "LoRA/FeDeRA layers run edgefed's fused Triton kernel on CUDA (off for comparison)"
    )

    def check(self) -> None:
        check_positive(rank=self.rank, alpha=self.alpha)
        check_at_most(MAX_COUNT, rank=self.rank)
        if any(not name.strip() for name in self.target_modules):
            raise EdgefedError("target-modules: an empty module name (e.g. query,value)")


@dataclass(frozen=True)
class BottleneckSettings(Settings):
    """Bottleneck and early-exit adapters: their width comes from the rank."""

    rank: int = option(AdapterSpec.rank, "LoRA/FeDeRA rank; adapters' bottleneck width")

    def check(self) -> None:
        check_positive(rank=self.rank)
        check_at_most(MAX_COUNT, rank=self.rank)


@dataclass(frozen=True)
class FreezeSettings(Settings):
    """FFDAPT: what stays frozen while the rest of the masked-LM model pre-trains."""

    freeze: tuple[str, ...] = option(
        AdapterSpec.freeze,
        "ffdapt: what stays frozen, comma-separated: embeddings, layers:<i>, layers:<i>-<j>",
        example="embeddings,layers:0-1",
    )

    def check(self) -> None:
        frozen_set(self.freeze)


@dataclass(frozen=True)
class SplitSettings(Settings):
    """FedBERT: how the server's body trains across clients, and how the split tensors travel."""

    split_strategy: str = option(
        "sequential",
        "fedbert: sequential (clients take turns on one body) or parallel (a body copy per client, "
        "averaged each round)",
    )
    split_codec: str = option("fp16", "fedbert: activations and gradients travel as none, fp16, bf16 or int8")

    def check(self) -> None:
        if self.split_codec not in SPLIT_CODECS:
            raise EdgefedError(f"split codec '{self.split_codec}' is not one of: {', '.join(SPLIT_CODECS)}")
        if self.split_strategy not in SPLIT_STRATEGIES:
            choices = ", ".join(SPLIT_STRATEGIES)
            raise EdgefedError(f"unknown split-strategy '{self.split_strategy}'; choose one of: {choices}")


METHOD_SETTINGS: tuple[type[Settings], ...] = (
    LowRankSettings,
    BottleneckSettings,
    FreezeSettings,
    SplitSettings,
)


def frozen_set(items: tuple[str, ...], num_layers: int | None = None) -> tuple[bool, set[int]]:
    """(embeddings frozen, frozen encoder layers) from `embeddings`, `layers:<i>` and `layers:<i>-<j>`;
    with `num_layers`, checked against a model of that depth."""
    embeddings, layers = False, set()
    for item in items:
        match = LAYER_RANGE.fullmatch(item)
        if item == "embeddings":
            embeddings = True
        elif match:
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if first > last or (num_layers is not None and last >= num_layers):
                raise EdgefedError(
                    f"freeze '{item}': not a range of this model's layers (0-{(num_layers or 1) - 1})"
                )
            layers.update(range(first, last + 1))
        else:
            raise EdgefedError(
                f"freeze '{item}': expected embeddings, layers:<i> or layers:<i>-<j> "
                "(e.g. embeddings,layers:0)"
            )
    if embeddings and num_layers is not None and len(layers) == num_layers:
        raise EdgefedError("freeze leaves only the MLM head to train; unfreeze at least one layer")
    return embeddings, layers
