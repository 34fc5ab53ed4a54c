"""Instruction tuning of a decoder language model: prompts and answers (an instruction JSONL file), or
labelled texts posed as prompts whose answer is the label's name (edgefed/data/prompts.py); evaluated
by its answers (edgefed/families/causal_lm.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgefed.data import load_splits
from edgefed.data.prompts import (
    PromptAnswers,
    PromptExamples,
    check_template,
    encode_prompts,
    is_instruction_file,
    label_names_for,
    posed,
    read_instructions,
)
from edgefed.data.splits import EVAL_SPLIT_NAMES, SAMPLE_DIR, hold_out
from edgefed.errors import EdgefedError
from edgefed.tasks.base import TASKS, DataSettings, Task

if TYPE_CHECKING:
    from edgefed.config import RunConfig


@TASKS.register("instruction")
class InstructionTuning(Task):
    name = "instruction"
    family = "causal-lm"

    def check(self, config: RunConfig) -> None:
        super().check(config)
        check_template(config.prompt_template)
        if config.profiles:
            raise EdgefedError("--profiles plans encoder fine-tuning; a decoder LM's plans are not there yet")
        if set(config.client_runtime) != {"torch"}:
            raise EdgefedError("only the torch runtime trains a decoder LM yet (client-runtime torch)")
        if config.transport != "inproc":
            raise EdgefedError("a decoder LM trains in process (--transport inproc) for now")

    def load_data(self, settings: DataSettings) -> tuple[PromptAnswers, PromptAnswers]:
        path = SAMPLE_DIR if settings.data is None else Path(settings.data)
        if holds_instructions(path):
            train, evaluation = instruction_splits(path, settings.seed)
        else:
            labeled_train, labeled_eval = load_splits(str(path), settings.seed)
            names = label_names_for(str(path))
            train = posed(labeled_train, names, settings.prompt_template)
            evaluation = posed(labeled_eval, names, settings.prompt_template)
        train = train.subset(list(range(min(settings.train_limit or len(train), len(train)))))
        evaluation = evaluation.subset(
            list(range(min(settings.eval_limit or len(evaluation), len(evaluation))))
        )
        return train, evaluation

    def num_labels(self, train: PromptAnswers, evaluation: PromptAnswers) -> int:
        return len(train.label_names)

    def encode(self, data: PromptAnswers, tokenizer, max_seq_len: int) -> PromptExamples:
        return encode_prompts(data, tokenizer, max_seq_len)


def holds_instructions(path: Path) -> bool:
    """Whether `path` (a file, or a folder's train.jsonl) is instruction JSONL rather than labelled text."""
    return is_instruction_file(path / "train.jsonl" if path.is_dir() else path)


def instruction_splits(path: Path, seed: int) -> tuple[PromptAnswers, PromptAnswers]:
    if path.is_dir():
        train = read_instructions(path / "train.jsonl")
        for name in EVAL_SPLIT_NAMES:
            if (path / f"{name}.jsonl").is_file():
                return train, read_instructions(path / f"{name}.jsonl")
    else:
        train = read_instructions(path)
    return hold_out(train, seed)
