"""Few-shot multi-task data: task folders, and what each client of a multi-task run holds.

A task is a folder with `train.*`, an evaluation split (`test`, `dev`, ...) and `labels.txt`, the
name of label i on line i+1 (the names are what a label-scoring model compares inputs with). A
client of a multi-task run holds one task: K labelled training examples per class and a pool of that
task's other training inputs, unlabelled. On a device that is a folder too (`write_shard`):

    labels.txt      the task's label names
    train.jsonl     the K labelled examples per class; the last `holdout` of each class in file order
                    are the client's held-out slice (FewFedWeight scores its model on them)
    unlabeled.txt   the unlabelled pool, one input per line
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefed.data.batches import EncodedExamples
from edgefed.data.files import LabeledTexts, read_labeled_file, read_text_file
from edgefed.data.splits import EVAL_SPLIT_NAMES, find_split, load_train
from edgefed.errors import EdgefedError

LABELS_FILE = "labels.txt"
UNLABELED_FILE = "unlabeled.txt"
SHARD_TRAIN_FILE = "train.jsonl"


@dataclass
class TaskData:
    """One task folder: its name (the folder's), label names, training and evaluation splits."""

    name: str
    label_names: list[str]
    train: LabeledTexts
    test: LabeledTexts


@dataclass
class FewShotShard:
    """What one client of a multi-task run holds."""

    task: str
    label_names: list[str]
    labeled: LabeledTexts  # K per class, grouped by class; the last `holdout` of each are held out
    unlabeled: list[str]

    def __len__(self) -> int:
        return len(self.labeled)

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LABELS_FILE).write_text("\n".join(self.label_names) + "\n", encoding="utf-8")
        with (folder / SHARD_TRAIN_FILE).open("w", encoding="utf-8") as handle:
            for text, label in zip(self.labeled.texts, self.labeled.labels, strict=True):
                handle.write(json.dumps({"text": text, "label": label}) + "\n")
        (folder / UNLABELED_FILE).write_text(
            "".join(" ".join(text.split()) + "\n" for text in self.unlabeled), encoding="utf-8"
        )
        return folder


def read_label_names(folder: Path) -> list[str]:
    path = folder / LABELS_FILE
    if not path.is_file():
        raise EdgefedError(f"{folder}: no {LABELS_FILE} (the name of label i on line i+1); a task needs one")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if len(names) < 2 or not all(names):
        raise EdgefedError(f"{path}: expected one non-empty label name per line, at least two")
    return names


def check_labels(data: LabeledTexts, names: list[str]) -> None:
    for line, label in enumerate(data.labels):
        if label >= len(names):
            raise EdgefedError(
                f"{data.source}: example {line + 1} has label {label}, outside labels.txt's "
                f"{len(names)} names (0..{len(names) - 1})"
            )


def load_task(path: str | Path) -> TaskData:
    """A task folder, checked: labels.txt exists and every label names one of its lines."""
    folder = Path(path)
    if not folder.is_dir():
        raise EdgefedError(f"{folder}: no such task folder")
    names = read_label_names(folder)
    train = load_train(folder)
    evaluation = find_split(folder, EVAL_SPLIT_NAMES, required=False)
    if evaluation is None:
        raise EdgefedError(f"{folder}: no evaluation split (expected test.*, dev.* or validation.*)")
    test = read_labeled_file(evaluation)
    for split in (train, test):
        check_labels(split, names)
    return TaskData(folder.name, names, train, test)


def draw_shards(
    tasks: list[TaskData], clients: int, shots: int, holdout: int, pool: int, seed: int
) -> list[FewShotShard]:
    """Client k holds task k mod T; its shots and pool are drawn by (seed, task name, k div T), so a
    run on one task alone (local-only training) draws exactly what the multi-task run's client holds."""
    if not tasks:
        raise EdgefedError("a multi-task run needs at least one task")
    if holdout >= shots:
        raise EdgefedError(f"holdout-shots {holdout} must be fewer than shots {shots}")
    return [
        _draw(tasks[client % len(tasks)], client // len(tasks), shots, holdout, pool, seed)
        for client in range(clients)
    ]


def _draw(task: TaskData, replica: int, shots: int, holdout: int, pool: int, seed: int) -> FewShotShard:
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode()), replica])
    labels = np.asarray(task.train.labels)
    trained, held = [], []
    for label, name in enumerate(task.label_names):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise EdgefedError(
                f"task {task.name}: class {label} ({name}) has {len(members)} training examples, "
                f"fewer than shots {shots}"
            )
        chosen = rng.choice(members, size=shots, replace=False).tolist()
        trained.extend(chosen[: shots - holdout])
        held.append(chosen[shots - holdout :])
    # Grouped by class with each class's held-out tail last, so the client can find its slice.
    by_class: dict[int, list[int]] = {}
    for index in trained:
        by_class.setdefault(task.train.labels[index], []).append(index)
    rows = [index for label in range(len(task.label_names)) for index in by_class[label] + held[label]]
    taken = set(rows)
    rest = [index for index in rng.permutation(len(labels)).tolist() if index not in taken]
    if not rest:
        raise EdgefedError(f"task {task.name}: no training inputs left for a client's unlabelled pool")
    unlabeled = [task.train.texts[index] for index in rest[:pool]]
    return FewShotShard(task.name, task.label_names, task.train.subset(rows), unlabeled)


def read_shard(path: str | Path) -> FewShotShard:
    """A client's folder as `FewShotShard.write` leaves it (or as a device's owner fills it)."""
    folder = Path(path)
    if not folder.is_dir():
        raise EdgefedError(
            f"{folder}: a multi-task client's data is a folder (labels.txt, train.*, unlabeled.txt)"
        )
    names = read_label_names(folder)
    labeled = load_train(folder)
    check_labels(labeled, names)
    pool_path = folder / UNLABELED_FILE
    if not pool_path.is_file():
        raise EdgefedError(
            f"{folder}: no {UNLABELED_FILE}: the client has no unlabelled pool to pseudo-label"
        )
    unlabeled = read_text_file(pool_path).texts
    return FewShotShard(folder.name, names, labeled, unlabeled)


def held_out_rows(labels: list[int], holdout: int) -> list[int]:
    """The last `holdout` examples of each class in file order: the client's held-out slice."""
    rows: list[int] = []
    for label in sorted(set(labels)):
        members = [row for row, value in enumerate(labels) if value == label]
        if len(members) <= holdout:
            raise EdgefedError(
                f"class {label} has {len(members)} labelled examples: none left to train on after "
                f"holding out {holdout}"
            )
        rows.extend(members[-holdout:] if holdout else [])
    return sorted(rows)


@dataclass
class FewShotExamples:
    """A multi-task client's data, tokenised: what it trains on, its held-out slice, its unlabelled pool."""

    labeled: EncodedExamples
    heldout: EncodedExamples
    unlabeled: EncodedExamples

    def __len__(self) -> int:
        return len(self.labeled)
