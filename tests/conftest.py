"""Shared fixtures: a tiny random BERT (fast) and the small data sets committed in tests/data."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`make test` runs a worker per core) each worker computes on one thread: two
# threads a worker would oversubscribe the cores and slow every test down. OMP_NUM_THREADS, where set,
# wins (torch reads it itself): the suite must pass with any thread count.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

import pytest

from edgefed.models import load_tokenizer, resolve_model_path
from tests.federation_harness import serve_federation
from tests.tiny import tiny_bert_config, tiny_llama

# What the tests read ships with the repository (tests/data/README.md says where each row comes from).
TEST_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def federation():
    """A Federation server for 3 clients with bearer tokens on loopback (tests/federation_harness.py)."""
    with serve_federation() as served:
        yield served


@pytest.fixture
def crash_after_round(monkeypatch):
    """`crash_after_round(n)`: the next run dies (as on Ctrl-C) right after writing round n's checkpoint,
    or with `saved=False` right before it; `monkeypatch.undo()` lets the one after it resume."""
    from edgefed.federation import policy

    save = policy.save_checkpoint

    def arm(round_number: int, saved: bool = True) -> None:
        def save_then_die(run_dir, checkpoint):
            if saved or checkpoint.round != round_number:
                save(run_dir, checkpoint)
            if checkpoint.round == round_number:
                raise KeyboardInterrupt

        monkeypatch.setattr(policy, "save_checkpoint", save_then_die)

    return arm


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
def tiny_llama_dir(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer, 32-wide random Llama with MiniLM's tokenizer and a chat template (tests/tiny.py)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), load_tokenizer(minilm_path), chat=True)


@pytest.fixture(scope="session")
def small_data_dir() -> Path:
    """400 training and 100 dev rows of SST-2 with its labels.txt (tests/data/sst2)."""
    return TEST_DATA / "sst2"


@pytest.fixture(scope="session")
def fewshot_dir() -> Path:
    """Three small few-shot task folders (mr, subj, trec): 30 training rows per class and 40 test rows
    each, with their labels.txt (tests/data/fewshot)."""
    return TEST_DATA / "fewshot"


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
