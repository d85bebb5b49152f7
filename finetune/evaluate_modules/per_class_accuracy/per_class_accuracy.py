"""Per-class accuracy (recall of each class) and its mean (balanced accuracy).

Shipped inside bit-transfer and loaded with `evaluate.load(<path of this folder>)` (no network).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy within each class: correct predictions of class c / examples of class c."
_INPUTS = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
    num_classes (`int`, *optional*): number of classes (default: one more than the largest id seen).
Returns:
    per_class_accuracy (`list[float | None]`): for each class id, its accuracy, None if it has no example.
    mean_per_class_accuracy (`float`): the mean over the classes that have examples.
"""


class PerClassAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_classes=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            raise ValueError("per-class accuracy of zero examples is undefined.")
        num_classes = (
            int(num_classes) if num_classes is not None else int(max(predictions.max(), references.max())) + 1
        )
        examples = np.bincount(references, minlength=num_classes)
        correct = np.bincount(references[predictions == references], minlength=num_classes)
        per_class = [float(c / n) if n else None for c, n in zip(correct, examples)]
        present = [value for value in per_class if value is not None]
        return {"per_class_accuracy": per_class, "mean_per_class_accuracy": float(np.mean(present))}
