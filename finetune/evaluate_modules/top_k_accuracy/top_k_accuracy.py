"""Top-k accuracy: the fraction of examples whose reference class is among the k highest-scored classes.

Shipped inside bit-transfer and loaded with `evaluate.load(<path of this folder>)` (no network).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-k accuracy: an example counts as correct when its true class is among the k predicted ones."
_INPUTS = """
Args:
    predictions (`list[list[int]]`): for each example, the ids of its k highest-scored classes.
    references (`list[int]`): true class ids.
Returns:
    top_{k}_accuracy (`float`): in [0, 1], k being the length of each prediction.
"""


class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        if len(references) == 0:
            raise ValueError("top-k accuracy of zero examples is undefined.")
        top_k, references = np.asarray(predictions), np.asarray(references)
        hits = (top_k == references[:, None]).any(axis=1)
        return {f"top_{top_k.shape[1]}_accuracy": float(hits.mean())}
