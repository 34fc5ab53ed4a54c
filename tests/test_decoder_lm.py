"""Decoder language models: prompt/answer data, answer-only loss, evaluation by likelihood and by
generation, and federated runs of lora, federa and fft on a tiny random Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from edgefed.components import resolve_config, task_of
from edgefed.data.files import LabeledTexts
from edgefed.data.prompts import (
    IGNORED,
    encode_prompts,
    posed,
    prompt_answer_ids,
    read_instructions,
    truncated,
)
from edgefed.errors import EdgefedError
from edgefed.families.causal_lm import CausalLanguageModel
from edgefed.federation.runner import run
from edgefed.models import is_causal_lm, load_tokenizer
from tests.tiny import tiny_llama


@pytest.fixture(scope="module", params=["chat", "plain"])
def llama_dir(request, tmp_path_factory, minilm_path) -> Path:
    folder = tmp_path_factory.mktemp(f"tiny-llama-{request.param}")
    return tiny_llama(folder, load_tokenizer(minilm_path), chat=request.param == "chat")


def decoder_run(tmp_path: Path, model: Path, data: Path, **flags) -> dict:
    values = {
        "model": str(model),
        "data": str(data),
        "clients": 2,
        "rounds": 2,
        "train_limit": 48,
        "eval_limit": 16,
        "local_steps": 2,
        "batch_size": 8,
        "max_seq_len": 64,
        "out": str(tmp_path / "run"),
        **flags,
    }
    run(resolve_config(None, values), echo=lambda line: None)
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_a_causal_lm_folder_is_told_from_an_encoder(llama_dir, tiny_model_dir):
    assert is_causal_lm(str(llama_dir)) and is_causal_lm("any.gguf")
    assert not is_causal_lm(str(tiny_model_dir)) and not is_causal_lm("all-MiniLM-L6-v2")
    assert task_of(resolve_config(None, {"model": str(llama_dir)})).name == "instruction"


def test_the_loss_covers_the_answer_tokens_only(llama_dir):
    tokenizer = load_tokenizer(str(llama_dir))
    texts = LabeledTexts(["a fine film", "a dull film"], [1, 0], "x")
    data = posed(texts, ["negative", "positive"], "{text}")
    examples = encode_prompts(data, tokenizer, 64)
    batch = examples.batch([0, 1])
    for row in range(2):
        prompt, answer = examples.prompts[row], examples.answers[row]
        labels = batch["labels"][row].tolist()
        assert labels[: len(prompt)] == [IGNORED] * len(prompt)
        assert labels[len(prompt) : len(prompt) + len(answer)] == answer
        assert set(labels[len(prompt) + len(answer) :]) <= {IGNORED}
    assert examples.answer_text(examples.answers[0]) == "positive"
    assert examples.label_answers[1] == examples.answers[0]  # the label's answer as training sees it


def test_a_chat_template_poses_the_prompt_and_ends_the_answer_with_its_turn(llama_dir):
    tokenizer = load_tokenizer(str(llama_dir))
    prompt, answer = prompt_answer_ids(tokenizer, [{"role": "user", "content": "hi"}], "yes")
    if tokenizer.chat_template:
        assert tokenizer.decode(prompt) == "< user > hi [SEP] < assistant >"
    assert tokenizer.decode(answer) == "yes [SEP]"


def test_long_prompts_lose_their_start_and_answers_stay_whole():
    prompt, answer = truncated(list(range(100)), [7, 8, 9], 16)
    assert prompt == list(range(87, 100)) and answer == [7, 8, 9]
    prompt, answer = truncated(list(range(10)), list(range(100, 140)), 16)
    assert answer == list(range(100, 108)) and prompt == list(range(2, 10))
    assert truncated([1, 2], [3], 16) == ([1, 2], [3])


def test_instruction_files_in_both_shapes(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
        {"instruction": "Greet", "output": "hello"},
        {
            "messages": [
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"},
            ]
        },
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = read_instructions(path)
    assert data.answers == ["4", "hello", "Paris"]
    assert data.prompts[0] == [{"role": "user", "content": "Add\n\n2 and 2"}]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(EdgefedError, match=r"train.jsonl:1: `messages` must be"):
        read_instructions(path)
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(EdgefedError, match=r"train.jsonl:1: expected `instruction` and `output`"):
        read_instructions(path)


def test_evaluation_scores_labels_by_likelihood_and_by_generation(llama_dir):
    """On a random model: the likelihood choice is the label whose answer scores highest (computed here
    token by token), and the perplexity is exp of the answer loss."""
    tokenizer = load_tokenizer(str(llama_dir))
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    texts = LabeledTexts(["good", "bad", "fine", "awful"], [1, 0, 1, 0], "x")
    examples = encode_prompts(posed(texts, ["negative", "positive"], "{text}"), tokenizer, 64)
    evaluation = CausalLanguageModel().evaluate(model, examples, torch.device("cpu"))
    expected = []
    with torch.no_grad():
        for prompt in examples.prompts:
            scores = []
            for answer in examples.label_answers:
                logits = model(torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
                after = len(prompt) - 1  # the logits at position p predict token p + 1
                scores.append(sum(float(logits[after + i, token]) for i, token in enumerate(answer)))
            expected.append(max(range(2), key=scores.__getitem__))
    assert evaluation.accuracy == sum(map(int.__eq__, expected, texts.labels)) / 4
    assert 0.0 <= evaluation.generated_accuracy <= 1.0
    assert evaluation.perplexity == pytest.approx(math.exp(evaluation.loss))


@pytest.mark.parametrize("method", ["lora", "federa", "fft"])
def test_a_decoder_federates_and_its_answer_loss_falls(tmp_path, llama_dir, small_data_dir, method):
    lr = {"lora": 0.01, "federa": 0.01, "fft": 0.003}[method]
    rows = decoder_run(tmp_path, llama_dir, small_data_dir, method=method, lr=lr, local_steps=4)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(0 <= row["generated_accuracy"] <= 1 and row["perplexity"] > 1 for row in rows)


def test_decoder_runs_refuse_what_does_not_apply_in_one_line(tmp_path, llama_dir, small_data_dir):
    cases = {
        "bitfit": ({"method": "bitfit"}, "has no bias terms"),
        "adapter": ({"method": "adapter"}, "does not train decoder LMs yet"),
        "fdapt": ({"method": "fdapt"}, "does not train decoder LMs yet"),
        "grpc": ({"transport": "grpc"}, "trains in process"),
        "ort": ({"client_runtime": "ort"}, "only the torch runtime"),
        "template": ({"prompt_template": "{label}"}, "prompt-template"),
    }
    for name, (flags, message) in cases.items():
        with pytest.raises(EdgefedError, match=message):
            decoder_run(tmp_path / name, llama_dir, small_data_dir, **flags)
    no_names = tmp_path / "unnamed"
    no_names.mkdir()
    for split in ("train.tsv", "dev.tsv"):
        (no_names / split).write_text((small_data_dir / split).read_text())
    with pytest.raises(EdgefedError, match=r"labels\.txt"):
        decoder_run(tmp_path / "names", llama_dir, no_names)


def test_a_gguf_path_that_is_not_a_file_is_refused():
    from edgefed.models import resolve_model_path

    with pytest.raises(EdgefedError, match="no such GGUF file"):
        resolve_model_path("/nonexistent/model.gguf")


def test_an_instruction_file_federates_with_free_form_answers(tmp_path, llama_dir):
    """Free-form answers: no label accuracy to report, the answer loss and its perplexity instead."""
    data = tmp_path / "instructions.jsonl"
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "amber", "piano"]
    rows = [{"instruction": "Repeat the word.", "input": word, "output": word} for word in words * 5]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = decoder_run(tmp_path, llama_dir, data, method="lora", lr=0.05, partition="iid")
    assert all("generated_accuracy" not in row and row["perplexity"] > 1 for row in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
