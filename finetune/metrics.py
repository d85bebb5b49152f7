"""Classification metrics through `evaluate`, from modules shipped in this package.

`evaluate.load("accuracy")` fetches the module from the Hub and fails offline, so the three modules
(top-1 accuracy, top-k accuracy, per-class accuracy) live in `finetune/evaluate_modules/` and are loaded
from there with `evaluate.load(<local folder>)`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import evaluate
import numpy as np
from transformers import EvalPrediction

EVALUATE_MODULES = Path(__file__).resolve().parent / "evaluate_modules"
# Top-5 accuracy is reported when there are at least this many classes (with fewer it is trivially 1).
TOP_K = 5


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """One of the shipped modules: "accuracy", "top_k_accuracy", "per_class_accuracy"."""
    folder = EVALUATE_MODULES / name
    if not (folder / f"{name}.py").is_file():
        raise ValueError(
            f"No shipped metric {name!r}; available: {sorted(p.name for p in EVALUATE_MODULES.iterdir())}."
        )
    return evaluate.load(str(folder))


class ClassificationMetrics:
    """`compute_metrics` for a Trainer: accuracy, top-5 accuracy (5+ classes), optional per-class accuracy.

    Single-label classification only (one class index per example), which is what `bit-finetune` trains.
    `BitTrainer`'s loss and MixUp also handle multi-label heads (multi-hot float labels), but top-1 accuracy
    does not measure them: pass your own `compute_metrics` (e.g. mean average precision) for those.

    Per-class accuracy is returned as {class name: accuracy} under `per_class_accuracy`, with its mean
    as `mean_per_class_accuracy`.
    """

    def __init__(self, label_names: Sequence[str], per_class: bool = False):
        self.label_names = list(label_names)
        self.per_class = per_class

    def __call__(self, prediction: EvalPrediction) -> dict:
        logits = np.asarray(prediction.predictions)
        references = np.asarray(prediction.label_ids)
        if references.ndim != 1:
            raise ValueError(
                f"ClassificationMetrics scores single-label predictions (one class index per example); got labels "
                f"of shape {references.shape} (multi-label?). Pass a multi-label compute_metrics to the trainer."
            )
        predicted = logits.argmax(axis=-1)
        metrics = load_metric("accuracy").compute(predictions=predicted, references=references)
        if len(self.label_names) >= TOP_K:
            top_k = np.argpartition(-logits, TOP_K - 1, axis=-1)[:, :TOP_K]
            metrics.update(load_metric("top_k_accuracy").compute(predictions=top_k, references=references))
        if self.per_class:
            result = load_metric("per_class_accuracy").compute(
                predictions=predicted, references=references, num_classes=len(self.label_names)
            )
            metrics["per_class_accuracy"] = dict(zip(self.label_names, result["per_class_accuracy"]))
            metrics["mean_per_class_accuracy"] = result["mean_per_class_accuracy"]
        return metrics
