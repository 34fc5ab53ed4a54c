"""Data: reading labelled text files, splitting them across clients, and batching tokenised examples."""

from edgefed.data.batches import EncodedExamples, encode, ordered_batches, shuffled_batches
from edgefed.data.files import LabeledTexts, read_labeled_file
from edgefed.data.partition import parse_partition, partition
from edgefed.data.splits import SAMPLE_DIR, load_splits

__all__ = [
    "SAMPLE_DIR",
    "EncodedExamples",
    "LabeledTexts",
    "encode",
    "load_splits",
    "ordered_batches",
    "parse_partition",
    "partition",
    "read_labeled_file",
    "shuffled_batches",
]
