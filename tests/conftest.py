"""Shared fixtures: a tiny random BERT (fast), small SST-2 files, and the full SST-2 in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`make test` runs a worker per core) each worker computes on one thread: two
# threads a worker would oversubscribe the cores and slow every test down.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest

from edgefed.models import load_tokenizer, resolve_model_path
from tests.federation_harness import serve_federation
from tests.tiny import tiny_bert_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_SST2 = Path(os.environ.get("EDGEFED_SST2", ROOT.parent / "shared" / "data" / "sst2"))
SHARED_DATA = SHARED_SST2.parent


@pytest.fixture
def federation():
    """A Federation server for 3 clients with bearer tokens on loopback (tests/federation_harness.py)."""
    with serve_federation() as served:
        yield served


@pytest.fixture
def crash_after_round(monkeypatch):
    """`crash_after_round(n)`: the next run dies (as on Ctrl-C) right after writing round n's checkpoint;
    `monkeypatch.undo()` lets the one after it resume."""
    from edgefed.federation import policy

    save = policy.save_checkpoint

    def arm(round_number: int) -> None:
        def save_then_die(run_dir, checkpoint):
            save(run_dir, checkpoint)
            if checkpoint.round == round_number:
                raise KeyboardInterrupt

        monkeypatch.setattr(policy, "save_checkpoint", save_then_die)

    return arm


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    if not (SHARED_SST2 / "train.tsv").is_file():
        pytest.fail(
            f"SST-2 not found at {SHARED_SST2}; set EDGEFED_SST2 to the folder with train.tsv and dev.tsv"
        )
    return SHARED_SST2


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return resolve_model_path("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved without a classification head."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(1234)
    config = tiny_bert_config()
    BertModel(config).save_pretrained(folder)
    load_tokenizer(minilm_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory, sst2_dir) -> Path:
    """400 training and 100 dev rows of SST-2, in the shared data's own format."""
    folder = tmp_path_factory.mktemp("sst2-small")
    for name, rows in (("train.tsv", 400), ("dev.tsv", 100)):
        lines = (sst2_dir / name).read_text(encoding="utf-8").splitlines()[: rows + 1]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "labels.txt").write_text(
        (sst2_dir / "labels.txt").read_text(encoding="utf-8"), encoding="utf-8"
    )
    return folder


@pytest.fixture(scope="session")
def fewshot_dir(tmp_path_factory) -> Path:
    """Three small task folders from ../shared/data/fewshot (mr, subj, trec): 30 training rows per class
    and 40 test rows each, with their labels.txt."""
    folder = tmp_path_factory.mktemp("fewshot")
    for task in ("mr", "subj", "trec"):
        source = SHARED_DATA / "fewshot" / task
        (folder / task).mkdir()
        header, *rows = (source / "train.tsv").read_text(encoding="utf-8").splitlines()
        by_label: dict[str, list[str]] = {}
        for row in rows:
            by_label.setdefault(row.rsplit("\t", 1)[1], []).append(row)
        kept = [row for members in by_label.values() for row in members[:30]]
        (folder / task / "train.tsv").write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")
        test = (source / "test.tsv").read_text(encoding="utf-8").splitlines()[:41]
        (folder / task / "test.tsv").write_text("\n".join(test) + "\n", encoding="utf-8")
        (folder / task / "labels.txt").write_text((source / "labels.txt").read_text(encoding="utf-8"))
    return folder


@pytest.fixture(scope="session")
def fleet_profiles(tmp_path_factory) -> str:
    """Two device profiles for the tiny model, as a fleet list: a fast device and a slow one (slow enough
    that a budget of 1.5 s makes it freeze a layer)."""
    from edgefed.devices.profiles import load_profile, profile_toml

    folder = tmp_path_factory.mktemp("profiles")
    base = load_profile("jetson-agx-orin-64gb-maxn")
    paths = []
    for name, tflops in (("fast-device", 5.0), ("slow-device", 0.00005)):
        profile = base.__class__(**{**base.__dict__, "name": name, "fp32_tflops": tflops, "source": ""})
        path = folder / f"{name}.toml"
        path.write_text(profile_toml(profile), encoding="utf-8")
        paths.append(str(path))
    return ",".join(paths)


@pytest.fixture(scope="session")
def still_model_dir(tmp_path_factory, minilm_path) -> Path:
    """The tests' tiny random BERT without dropout: the runtimes that train exported adapters export it
    without, so a torch round and theirs see the same function."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    torch.manual_seed(1234)
    BertModel(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(
        folder
    )
    load_tokenizer(minilm_path).save_pretrained(folder)
    return folder
