"""Data: reading labelled text files, splitting them across clients, and batching tokenised examples.

`edgefed.data.batches` (which needs torch) is imported when one of its names is first used, so that a
torch-free device (the ONNX Runtime client) can read its data through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

from edgefed.data.files import LabeledTexts, read_labeled_file
from edgefed.data.partition import parse_partition, partition
from edgefed.data.splits import SAMPLE_DIR, load_splits

BATCHES = ("EncodedExamples", "encode", "ordered_batches", "shuffled_batches")

__all__ = [
    "SAMPLE_DIR",
    "LabeledTexts",
    "load_splits",
    "parse_partition",
    "partition",
    "read_labeled_file",
    *BATCHES,
]


def __getattr__(name: str) -> Any:
    if name not in BATCHES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.batches"), name)
