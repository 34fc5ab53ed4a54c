import json

import numpy as np
import pytest

from edgefed.data import SAMPLE_DIR, load_splits, partition, read_labeled_file
from edgefed.errors import EdgefedError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_csv_and_jsonl_read_the_same_examples(tmp_path):
    rows = [("a fine film", 1), ('it "stinks", really', 0)]
    tsv = write(tmp_path / "d.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    csv = write(tmp_path / "d.csv", 'text,label\na fine film,1\n"it ""stinks"", really",0\n')
    jsonl = write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    for path in (tsv, csv, jsonl):
        data = read_labeled_file(path)
        assert list(zip(data.texts, data.labels, strict=True)) == rows, path


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "nolabel.tsv",
            "sentence\tscore\ngood\t1\n",
            "nolabel.tsv:1: no 'label' column; the header has: sentence, score",
        ),
        ("notext.csv", "review,label\ngood,1\n", "notext.csv:1: no 'text' or 'sentence' column"),
        (
            "badlabel.tsv",
            "sentence\tlabel\ngood\t1\nbad\tneg\n",
            "badlabel.tsv:3: label 'neg' is not an integer",
        ),
        ("fields.tsv", "sentence\tlabel\ngood\t1\tx\n", "fields.tsv:2: expected 2 fields, found 3"),
        ("negative.tsv", "sentence\tlabel\ngood\t-1\n", "negative.tsv:2: label -1 is negative"),
        ("empty.tsv", "", "empty.tsv: the file is empty"),
        ("header.tsv", "sentence\tlabel\n", "header.tsv: the file holds no examples"),
        ("empty.jsonl", "\n", "empty.jsonl: the file is empty"),
        ("broken.jsonl", '{"text": "a", "label": 1}\n{"text": \n', "broken.jsonl:2: invalid JSON"),
        (
            "floatlabel.jsonl",
            '{"text": "a", "label": 1.5}\n',
            "floatlabel.jsonl:1: label 1.5 is not an integer",
        ),
        ("nofield.jsonl", '{"text": "a"}\n', "nofield.jsonl:1: no a 'label' field; fields: text"),
        ("data.parquet", "x", "unsupported data file type '.parquet'"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, expected):
    path = write(tmp_path / name, content)
    with pytest.raises(EdgefedError) as error:
        read_labeled_file(path)
    assert expected in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_non_utf8_file_is_reported(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("sentence\tlabel\ncr\xe8me\t1\n".encode("latin-1"))
    with pytest.raises(EdgefedError, match="not UTF-8"):
        read_labeled_file(path)


def test_folder_uses_its_dev_split_and_a_file_holds_out_deterministically(small_data_dir):
    train, evaluation = load_splits(str(small_data_dir), seed=0)
    assert (len(train), len(evaluation)) == (400, 100)
    assert evaluation.source.endswith("dev.tsv")
    first = load_splits(str(small_data_dir / "train.tsv"), seed=3)
    again = load_splits(str(small_data_dir / "train.tsv"), seed=3)
    assert (len(first[0]), len(first[1])) == (360, 40)
    assert first[1].texts == again[1].texts


def test_the_shipped_sample_is_the_default_data():
    train, evaluation = load_splits(None, seed=0)
    assert SAMPLE_DIR.is_dir() and (len(train), len(evaluation)) == (4000, 872)
    assert evaluation.source.endswith("dev.tsv")
    assert set(train.labels) == set(evaluation.labels) == {0, 1}


def test_iid_partition_covers_every_example_once():
    labels = [i % 2 for i in range(103)]
    shards = partition(labels, 4, "iid", seed=0)
    assert sorted(i for shard in shards for i in shard) == list(range(103))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def label_skew(shards, labels) -> float:
    """Mean over clients of the largest class share (0.5 = balanced for two classes)."""
    labels = np.asarray(labels)
    return float(np.mean([np.bincount(labels[shard], minlength=2).max() / len(shard) for shard in shards]))


def test_dirichlet_partition_is_deterministic_complete_and_skewed():
    labels = [int(i % 3 == 0) for i in range(2000)]
    shards = partition(labels, 5, "dirichlet:0.1", seed=7)
    assert shards == partition(labels, 5, "dirichlet:0.1", seed=7)
    assert shards != partition(labels, 5, "dirichlet:0.1", seed=8)
    assert sorted(i for shard in shards for i in shard) == list(range(2000))
    assert (
        label_skew(shards, labels) > label_skew(partition(labels, 5, "dirichlet:100", seed=7), labels) + 0.1
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dirichlet:0", "positive alpha"),
        ("dirichlet:x", "positive alpha"),
        ("zipf", "choose iid or dirichlet"),
    ],
)
def test_bad_partition_specs(spec, message):
    with pytest.raises(EdgefedError, match=message):
        partition([0, 1] * 50, 2, spec, seed=0)


def test_too_few_examples_for_the_clients():
    with pytest.raises(EdgefedError, match="too few for 10 clients"):
        partition([0, 1] * 20, 10, "iid", seed=0)
