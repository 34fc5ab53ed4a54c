"""Decoder language models (Llama, Qwen2, SmolLM, GPT-2, Phi: any `AutoModelForCausalLM`), judged as
their users judge them: by their answers.

`loss` is the mean cross-entropy over answer tokens and `perplexity` its exp. Where the answers are
label names, `accuracy` scores each label's answer by its likelihood after the prompt (the label with
the highest log-probability wins) and `generated_accuracy` generates greedily and counts exact matches
after normalisation (case, surrounding space and punctuation).
"""

from __future__ import annotations

import math
import string

import torch
import torch.nn.functional as F
from torch import nn

from edgefed.data import ordered_batches
from edgefed.data.prompts import IGNORED, PromptExamples, answer_batch
from edgefed.families.base import FAMILIES, CurveMetrics, ModelFamily
from edgefed.models import load_causal_lm
from edgefed.types import Evaluation

EVAL_BATCH_SIZE = 16
# The projections of every attention and MLP block, as Llama, Qwen2, Mistral and SmolLM name them,
# and as GPT-2 (c_attn, c_proj, c_fc) and Phi (dense, fc1, fc2) do; peft adapts those the model has.
DECODER_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "c_attn", "c_proj", "c_fc", "dense", "fc1", "fc2",
)  # fmt: skip


@FAMILIES.register("causal-lm")
class CausalLanguageModel(ModelFamily):
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    target_modules = DECODER_TARGETS
    metrics = CurveMetrics("accuracy", "answer loss")

    def load(self, model_path: str, num_labels: int) -> tuple[nn.Module, list[str]]:
        return load_causal_lm(model_path)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: PromptExamples, device: torch.device) -> Evaluation:
        model.eval()
        loss = answer_loss(model, examples, device)
        perplexity = math.exp(min(loss, 700.0))  # exp overflows past ~709
        if not examples.label_names:
            return Evaluation(0.0, loss, perplexity=perplexity)
        scored = likelihood_choices(model, examples, device)
        generated = generated_choices(model, examples, device)
        return Evaluation(
            share_right(scored, examples.labels),
            loss,
            generated_accuracy=share_right(generated, examples.labels),
            perplexity=perplexity,
        )


def answer_loss(model: nn.Module, examples: PromptExamples, device: torch.device) -> float:
    """Mean cross-entropy per answer token over the whole set."""
    total, tokens = 0.0, 0
    for indices in ordered_batches(len(examples), EVAL_BATCH_SIZE):
        batch = {key: value.to(device) for key, value in examples.batch(indices).items()}
        sums, counts = token_log_likelihoods(model, batch)
        total -= float(sums.sum())
        tokens += int(counts.sum())
    return total / max(tokens, 1)


def token_log_likelihoods(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its answer tokens, and how many there are."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORED
    log_probs = -F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none"
    )  # [rows, positions]
    return (log_probs * scored).sum(dim=1), scored.sum(dim=1)


def likelihood_choices(model: nn.Module, examples: PromptExamples, device: torch.device) -> list[int]:
    """Each example's label whose answer is the likeliest after its prompt."""
    names = len(examples.label_answers)
    choices = []
    for indices in ordered_batches(len(examples), max(1, EVAL_BATCH_SIZE // names)):
        prompts = [examples.prompts[i] for i in indices for _ in range(names)]
        answers = [answer for _ in indices for answer in examples.label_answers]
        batch = {
            key: value.to(device) for key, value in answer_batch(prompts, answers, examples.pad_id).items()
        }
        sums, _ = token_log_likelihoods(model, batch)
        choices += sums.view(len(indices), names).argmax(dim=1).tolist()
    return choices


def generated_choices(model: nn.Module, examples: PromptExamples, device: torch.device) -> list[int]:
    """Each example's greedy answer, as the label it names after normalisation (-1: none)."""
    names = {normalised(name): index for index, name in enumerate(examples.label_names)}
    longest = max(len(answer) for answer in examples.label_answers)
    choices = []
    for indices in ordered_batches(len(examples), EVAL_BATCH_SIZE):
        prompts = [examples.prompts[i] for i in indices]
        width = max(map(len, prompts))
        # Padded at the start, so that every row's next token follows its own prompt.
        ids = torch.tensor([[examples.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=longest + 2, do_sample=False,
            pad_token_id=examples.pad_id,
        )  # fmt: skip
        choices += [names.get(normalised(examples.answer_text(row)), -1) for row in out[:, width:].tolist()]
    return choices


def share_right(choices: list[int], labels: list[int]) -> float:
    return sum(choice == label for choice, label in zip(choices, labels, strict=True)) / len(labels)


def normalised(text: str) -> str:
    return text.strip().strip(string.punctuation + string.whitespace).casefold()
