"""Model families: what a model is, registered by name in `FAMILIES` (edgefed/families/base.py)."""

from edgefed.families.base import FAMILIES, CurveMetrics, ModelFamily
from edgefed.families.classifier import evaluate_classifier
from edgefed.families.label_scorer import LabelScorer
from edgefed.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["FAMILIES", "CurveMetrics", "LabelScorer", "ModelFamily", "evaluate_classifier"]
