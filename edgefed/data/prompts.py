"""Prompt/answer data for decoder language models: instruction files, and labelled texts posed as
prompts whose answer is the label's name; tokenised through the model's chat template where it has
one, with the loss on answer tokens only.

Instruction JSONL, one object per line, in either common shape:
- `{"instruction": ..., "input": ..., "output": ...}` (Alpaca's; `input` may be absent or empty);
- `{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}`
  (the last message is the answer; the ones before it, the prompt).

Truncation: an example longer than max-seq-len keeps its answer (cut at its end only where the answer
alone takes more than half of max-seq-len) and loses tokens from the start of its prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from edgefed.data.files import LabeledTexts
from edgefed.errors import EdgefedError

IGNORED = -100  # the label of a token the loss skips (the prompt, the padding)
Message = dict[str, str]


@dataclass
class PromptAnswers:
    """Prompts (each a chat: a list of messages) and their answers; `labels` holds each example's label
    index where the answers are label names (`label_names`), else 0 (free-form answers)."""

    prompts: list[list[Message]]
    answers: list[str]
    labels: list[int]
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: list[int]) -> PromptAnswers:
        return replace(
            self,
            prompts=[self.prompts[i] for i in indices],
            answers=[self.answers[i] for i in indices],
            labels=[self.labels[i] for i in indices],
        )


def read_instructions(path: Path) -> PromptAnswers:
    """An instruction JSONL file (either shape, see the module's docstring)."""
    prompts, answers = [], []
    try:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as error:
                    raise EdgefedError(f"{path}:{line_number}: not JSON ({error})") from None
                prompt, answer = instruction_row(row, f"{path}:{line_number}")
                prompts.append(prompt)
                answers.append(answer)
    except UnicodeDecodeError as error:
        raise EdgefedError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not prompts:
        raise EdgefedError(f"{path}: the file holds no examples")
    return PromptAnswers(prompts, answers, [0] * len(prompts), [], str(path))


def instruction_row(row: object, where: str) -> tuple[list[Message], str]:
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise EdgefedError(
                f"{where}: `messages` must be a list of {{role, content}} strings, two or more"
            )
        if messages[-1]["role"] != "assistant":
            raise EdgefedError(f"{where}: the last message is the answer: its role must be assistant")
        return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], messages[-1]["content"]
    if isinstance(row, dict) and "instruction" in row and "output" in row:
        parts = [row["instruction"], row.get("input") or ""]
        if not all(isinstance(part, str) for part in (*parts, row["output"])):
            raise EdgefedError(f"{where}: instruction, input and output must be strings")
        return [{"role": "user", "content": "\n\n".join(part for part in parts if part)}], row["output"]
    raise EdgefedError(f"{where}: expected `instruction` and `output`, or `messages`")


def is_instruction_file(path: Path) -> bool:
    """Whether a JSONL file holds instructions (its first row has `messages` or `instruction`)."""
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return False
                return isinstance(row, dict) and ("messages" in row or "instruction" in row)
    return False


def label_names_for(source: str) -> list[str]:
    """The label names of a labelled data set: labels.txt (one name per line, label i on line i+1)
    in its folder."""
    path = Path(source)
    names_file = (path if path.is_dir() else path.parent) / "labels.txt"
    if not names_file.is_file():
        raise EdgefedError(
            f"{source}: a decoder LM answers a labelled example with its label's name: put a labels.txt "
            "(one name per line, label 0 first) beside the data"
        )
    names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise EdgefedError(f"{names_file}: name two or more labels, each once")
    return names


def posed(data: LabeledTexts, names: list[str], template: str) -> PromptAnswers:
    """Labelled texts as prompts (`template`) whose answers are the labels' names."""
    if max(data.labels) >= len(names):
        raise EdgefedError(
            f"{data.source}: label {max(data.labels)} has no name ({len(names)} in labels.txt)"
        )
    listed = ", ".join(names)
    prompts = [
        [{"role": "user", "content": template.format(text=text, labels=listed)}] for text in data.texts
    ]
    return PromptAnswers(
        prompts, [names[label] for label in data.labels], list(data.labels), names, data.source
    )


def check_template(template: str) -> None:
    try:
        filled = template.format(text="\0", labels="\1")
    except (KeyError, IndexError, ValueError) as error:
        raise EdgefedError(
            f"prompt-template: only {{text}} and {{labels}} can be filled in ({error})"
        ) from None
    if "\0" not in filled:
        raise EdgefedError("prompt-template must contain {text}")


@dataclass
class PromptExamples:
    """Token ids of each example's prompt and answer (already truncated). Label tasks also carry each
    label's answer ids, which the evaluation scores against every prompt."""

    prompts: list[list[int]]
    answers: list[list[int]]
    labels: list[int]
    pad_id: int
    label_answers: list[list[int]] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    tokenizer: Any = None  # reads generated answers back (the evaluation's)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: list[int]) -> PromptExamples:
        return replace(
            self,
            prompts=[self.prompts[i] for i in indices],
            answers=[self.answers[i] for i in indices],
            labels=[self.labels[i] for i in indices],
        )

    def answer_text(self, generated: list[int]) -> str:
        """A generated answer's text: its tokens up to the first special one (the end of its turn)."""
        special = set(self.tokenizer.all_special_ids)
        end = next((i for i, token in enumerate(generated) if token in special), len(generated))
        return self.tokenizer.decode(generated[:end])

    def batch(self, indices: list[int], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Prompt then answer, padded at the end; the loss covers the answer tokens only."""
        return answer_batch(
            [self.prompts[i] for i in indices], [self.answers[i] for i in indices], self.pad_id
        )


def answer_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(prompt) + len(answer) for prompt, answer in zip(prompts, answers, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORED, dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        end = len(prompt) + len(answer)
        ids[row, :end] = torch.tensor(prompt + answer)
        mask[row, :end] = 1
        labels[row, len(prompt) : end] = torch.tensor(answer)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_prompts(data: PromptAnswers, tokenizer, max_seq_len: int) -> PromptExamples:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token(tokenizer)
    prompts, answers = [], []
    for prompt, answer in zip(data.prompts, data.answers, strict=True):
        prompt_ids, answer_ids = prompt_answer_ids(tokenizer, prompt, answer)
        prompt_ids, answer_ids = truncated(prompt_ids, answer_ids, max_seq_len)
        prompts.append(prompt_ids)
        answers.append(answer_ids)
    label_answers = []
    if data.label_names:  # each name as the answer to the first prompt: the template's tokens around it
        label_answers = [prompt_answer_ids(tokenizer, data.prompts[0], name)[1] for name in data.label_names]
    return PromptExamples(
        prompts, answers, list(data.labels), pad_id, label_answers, list(data.label_names), tokenizer
    )


def prompt_answer_ids(tokenizer, prompt: list[Message], answer: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt (ready for the answer to follow) and of its answer, with the tokens that
    end the answer's turn (the chat template's, else the end-of-sequence token)."""
    if getattr(tokenizer, "chat_template", None):
        head = chat_ids(tokenizer, prompt, add_generation_prompt=True)
        whole = chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": answer}], False)
        if whole[: len(head)] != head:
            raise EdgefedError("the tokenizer's chat template changes the prompt when an answer follows it")
        return head, whole[len(head) :]
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    text = "\n\n".join(message["content"] for message in prompt) + "\n"
    head = start + tokenizer(text, add_special_tokens=False)["input_ids"]
    return head, tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_token(tokenizer)]


def chat_ids(tokenizer, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def end_token(tokenizer) -> int:
    for token in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token is not None:
            return token
    raise EdgefedError("the tokenizer has no end-of-sequence token to end an answer with")


def truncated(prompt: list[int], answer: list[int], max_seq_len: int) -> tuple[list[int], list[int]]:
    """The module's truncation policy: the answer kept (up to half of max_seq_len), the prompt's start cut."""
    answer = answer[: max(max_seq_len // 2, max_seq_len - len(prompt))]
    keep = max_seq_len - len(answer)
    return prompt[len(prompt) - keep :] if len(prompt) > keep else prompt, answer
