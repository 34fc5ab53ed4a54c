"""The real all-MiniLM-L6-v2 on real SST-2 rows: the loss falls, and the smoke preset runs end to end."""

import json

import torch

from edgefed.cli import main
from edgefed.client.training import LocalTrainer
from edgefed.config import RunConfig
from edgefed.data import encode, load_splits
from edgefed.families import evaluate_classifier as evaluate
from edgefed.methods import METHODS, AdapterSpec, trainable_state
from edgefed.models import load_classifier, load_tokenizer


def test_federa_training_on_sst2_lowers_the_loss(minilm_path, small_data_dir):
    torch.manual_seed(0)
    train, _ = load_splits(str(small_data_dir), seed=0)
    examples = encode(train.subset(list(range(96))), load_tokenizer(minilm_path), max_seq_len=48)
    model, _ = METHODS.create("federa").prepare_global(load_classifier(minilm_path, 2)[0], AdapterSpec())
    trainer = LocalTrainer(model, 3e-3, 16, torch.device("cpu"), RunConfig.max_grad_norm)
    before = evaluate(model, examples, trainer.device).loss
    update = trainer.fit(0, trainable_state(model), examples, steps=12, seed=0)
    after = evaluate(model, examples, trainer.device).loss
    assert update.steps == 12 and update.num_examples == 96
    assert after < before - 0.03, (before, after)


def test_smoke_preset_on_an_sst2_folder_uses_its_dev_split(tmp_path, small_data_dir, capsys):
    out = tmp_path / "smoke"
    assert main(["run", "--preset", "smoke", "--data", str(small_data_dir), "--out", str(out)]) == 0
    assert "final accuracy" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_source"].endswith("dev.tsv") and summary["model"] == "all-MiniLM-L6-v2"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
