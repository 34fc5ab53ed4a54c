"""What a run trains for (registry): classification, masked-LM pre-training, few-shot multi-task."""

from edgefed.tasks.base import TASKS, DataSettings, Task
from edgefed.tasks.classification import SequenceClassification
from edgefed.tasks.instruction import InstructionTuning
from edgefed.tasks.masked_lm import MaskedLanguageModeling
from edgefed.tasks.multitask import FewShotMultiTask

__all__ = [
    "TASKS",
    "DataSettings",
    "FewShotMultiTask",
    "InstructionTuning",
    "MaskedLanguageModeling",
    "SequenceClassification",
    "Task",
]
