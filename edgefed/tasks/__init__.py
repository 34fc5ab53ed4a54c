"""What a run trains for (registry): classification, masked-LM pre-training, few-shot multi-task."""

from edgefed.tasks.base import TASKS, DataSettings, Task
from edgefed.tasks.classification import SequenceClassification, evaluate_classifier
from edgefed.tasks.masked_lm import MaskedLanguageModeling
from edgefed.tasks.multitask import FewShotMultiTask, LabelScorer

__all__ = [
    "TASKS",
    "DataSettings",
    "FewShotMultiTask",
    "LabelScorer",
    "MaskedLanguageModeling",
    "SequenceClassification",
    "Task",
    "evaluate_classifier",
]
