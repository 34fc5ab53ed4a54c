"""Reading labelled text from TSV, CSV and JSONL files, with errors that name the file and line."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from edgefed.errors import EdgefedError

TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMNS = ("label",)
SUFFIXES = (".tsv", ".csv", ".jsonl")
# Pre-training also reads plain text, one document per line.
TEXT_SUFFIXES = (".txt", *SUFFIXES)
# SST-2's longest phrase is ~270 characters; anything near this is a broken file, not a sentence.
MAX_FIELD_CHARS = 1_000_000


@dataclass
class LabeledTexts:
    """Texts with integer class labels, and the file they came from."""

    texts: list[str]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> LabeledTexts:
        return LabeledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.source)


def read_labeled_file(path: str | Path) -> LabeledTexts:
    """Read a `.tsv`, `.csv` or `.jsonl` file with a text column (`text` or `sentence`) and `label`."""
    path = Path(path)
    if not path.is_file():
        raise EdgefedError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise EdgefedError(f"{path}: unsupported data file type '{suffix}'; use one of {', '.join(SUFFIXES)}")
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = _read_jsonl(path, handle) if suffix == ".jsonl" else _read_delimited(path, handle, suffix)
            texts, labels = [], []
            for line, row in rows:
                text, label = row
                texts.append(text)
                labels.append(_parse_label(label, path, line))
    except UnicodeDecodeError as error:
        raise EdgefedError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not texts:
        raise EdgefedError(f"{path}: the file holds no examples")
    return LabeledTexts(texts, labels, str(path))


def read_text_file(path: str | Path) -> LabeledTexts:
    """Unlabelled text for pre-training: a `.txt` file (one document per line, blank lines skipped),
    or the text column of a labelled file, whose labels then only shape `dirichlet` partitions."""
    path = Path(path)
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise EdgefedError(
            f"{path}: unsupported text file type '{path.suffix}'; use one of {', '.join(TEXT_SUFFIXES)}"
        )
    if path.suffix.lower() != ".txt":
        return read_labeled_file(path)
    if not path.is_file():
        raise EdgefedError(f"{path}: no such data file")
    texts = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line, raw in enumerate(handle, start=1):
                text = raw.strip()
                if len(text) > MAX_FIELD_CHARS:
                    raise EdgefedError(f"{path}:{line}: line longer than {MAX_FIELD_CHARS} characters")
                if text:
                    texts.append(text)
    except UnicodeDecodeError as error:
        raise EdgefedError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not texts:
        raise EdgefedError(f"{path}: the file holds no text")
    return LabeledTexts(texts, [0] * len(texts), str(path))


def _read_delimited(path: Path, handle, suffix: str):
    if suffix == ".tsv":
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        raise EdgefedError(f"{path}: the file is empty") from None
    except csv.Error as error:
        raise EdgefedError(f"{path}:1: {error}") from None
    columns = [name.strip() for name in header]
    text_index = _column_index(columns, TEXT_COLUMNS, path)
    label_index = _column_index(columns, LABEL_COLUMNS, path)
    line = 1
    try:
        for line, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(columns):
                raise EdgefedError(f"{path}:{line}: expected {len(columns)} fields, found {len(fields)}")
            text = fields[text_index]
            if len(text) > MAX_FIELD_CHARS:
                raise EdgefedError(f"{path}:{line}: text field longer than {MAX_FIELD_CHARS} characters")
            yield line, (text, fields[label_index].strip())
    except csv.Error as error:
        raise EdgefedError(f"{path}:{line + 1}: {error}") from None


def _read_jsonl(path: Path, handle):
    seen_any = False
    for line, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        seen_any = True
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            raise EdgefedError(f"{path}:{line}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise EdgefedError(f"{path}:{line}: expected a JSON object, found {type(record).__name__}")
        text_key = next((key for key in TEXT_COLUMNS if key in record), None)
        if text_key is None or "label" not in record:
            missing = "a text field (text or sentence)" if text_key is None else "a 'label' field"
            raise EdgefedError(f"{path}:{line}: no {missing}; fields: {', '.join(record) or 'none'}")
        if not isinstance(record[text_key], str):
            raise EdgefedError(f"{path}:{line}: '{text_key}' is not a string")
        yield line, (record[text_key], record["label"])
    if not seen_any:
        raise EdgefedError(f"{path}: the file is empty")


def _column_index(columns: list[str], accepted: tuple[str, ...], path: Path) -> int:
    for name in accepted:
        if name in columns:
            return columns.index(name)
    wanted = " or ".join(f"'{name}'" for name in accepted)
    raise EdgefedError(f"{path}:1: no {wanted} column; the header has: {', '.join(columns) or 'nothing'}")


def _parse_label(value: object, path: Path, line: int) -> int:
    if isinstance(value, bool):
        raise EdgefedError(f"{path}:{line}: label {value!r} is not an integer")
    if isinstance(value, int):
        label = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        label = int(value)
    else:
        raise EdgefedError(f"{path}:{line}: label {value!r} is not an integer")
    if label < 0:
        raise EdgefedError(f"{path}:{line}: label {label} is negative; labels are class indices 0..C-1")
    return label
