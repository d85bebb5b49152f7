"""Top-1 accuracy: the fraction of predicted class ids equal to the reference class ids.

Shipped inside bit-transfer and loaded with `evaluate.load(<path of this folder>)`: the Hub's
`evaluate.load("accuracy")` needs the network.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy: (number of predictions equal to their reference) / (number of examples)."
_INPUTS = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): true class ids.
Returns:
    accuracy (`float`): in [0, 1].
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            raise ValueError("accuracy of zero examples is undefined.")
        return {"accuracy": float(np.mean(predictions == references))}
