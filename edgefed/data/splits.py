"""Finding the train and evaluation splits of a data set: a folder, a single file, or the shipped sample."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgefed.data.files import SUFFIXES, TEXT_SUFFIXES, LabeledTexts, read_labeled_file, read_text_file
from edgefed.errors import EdgefedError

SAMPLE_DIR = Path(__file__).parent / "sst2_sample"
EVAL_SPLIT_NAMES = ("dev", "validation", "valid", "test")
# A single file has no evaluation split: hold out this share (at most HOLDOUT_MAX examples).
HOLDOUT_FRACTION = 0.1
HOLDOUT_MAX = 2000


def load_splits(data: str | None, seed: int, unlabeled: bool = False) -> tuple[LabeledTexts, LabeledTexts]:
    """Return (train, eval). A folder needs `train.*` and one of dev/validation/valid/test.

    `unlabeled`: pre-training text, where `.txt` files (one document per line) are read too.
    """
    path = SAMPLE_DIR if data is None else Path(data)
    read, suffixes = _reader(unlabeled)
    if path.is_dir():
        train = read(find_split(path, ("train",), required=True, suffixes=suffixes))
        eval_path = find_split(path, EVAL_SPLIT_NAMES, required=False, suffixes=suffixes)
        if eval_path is not None:
            return train, read(eval_path)
        return hold_out(train, seed)
    if path.is_file():
        return hold_out(read(path), seed)
    raise EdgefedError(f"{path}: no such data file or folder")


def _reader(unlabeled: bool) -> tuple[Callable[[Path], LabeledTexts], tuple[str, ...]]:
    return (read_text_file, TEXT_SUFFIXES) if unlabeled else (read_labeled_file, SUFFIXES)


def find_split(
    folder: Path, names: tuple[str, ...], required: bool, suffixes: tuple[str, ...] = SUFFIXES
) -> Path | None:
    for name in names:
        for suffix in suffixes:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    if required:
        expected = ", ".join(f"{names[0]}{suffix}" for suffix in suffixes)
        raise EdgefedError(f"{folder}: no training file (expected one of {expected})")
    return None


def hold_out(data: LabeledTexts, seed: int) -> tuple[LabeledTexts, LabeledTexts]:
    if len(data) < 10:
        raise EdgefedError(f"{data.source}: {len(data)} examples are too few to hold out an evaluation split")
    order = np.random.default_rng(seed).permutation(len(data)).tolist()
    held = min(HOLDOUT_MAX, max(1, int(len(data) * HOLDOUT_FRACTION)))
    return data.subset(sorted(order[held:])), data.subset(sorted(order[:held]))


def load_train(data: str | Path, unlabeled: bool = False) -> LabeledTexts:
    """A client's own training data: every row of a file, or a folder's `train.*` file."""
    path = Path(data)
    read, suffixes = _reader(unlabeled)
    if path.is_dir():
        return read(find_split(path, ("train",), required=True, suffixes=suffixes))
    if path.is_file():
        return read(path)
    raise EdgefedError(f"{path}: no such data file or folder")
