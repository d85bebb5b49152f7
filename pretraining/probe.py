"""Few-shot linear probe: closed-form ridge regression on frozen pre-logits.

The BiT paper (§4.2, Fig. 5) shows upstream validation can look flat for a long time while the
representation still improves. A k-shot linear classifier on the pre-logits measures the representation
directly and costs one small linear solve, so the pre-training script runs it every few steps.
"""

from __future__ import annotations

import numpy as np
import torch

from .recipe import FEW_SHOT_EXAMPLES_PER_CLASS, FEW_SHOT_TRIALS, PROBE_MIN_TEST_EXAMPLES, PROBE_RIDGE


def fit_ridge_classifier(features: np.ndarray, labels: np.ndarray, num_classes: int, ridge: float = PROBE_RIDGE):
    """Return `predict(features) -> class ids` of a ridge regression onto +-1 one-hot targets.

    Features are L2-normalised, then centred on the fit set's mean. The solve uses the primal
    (d x d) or dual (n x n) normal equations, whichever is smaller.
    """
    x = _normalise(features)
    mean = x.mean(axis=0, keepdims=True)
    x = x - mean
    targets = 2.0 * np.eye(num_classes)[labels] - 1.0
    n, d = x.shape
    if n >= d:
        weights = np.linalg.solve(x.T @ x + ridge * np.eye(d), x.T @ targets)
    else:
        weights = x.T @ np.linalg.solve(x @ x.T + ridge * np.eye(n), targets)

    def predict(query: np.ndarray) -> np.ndarray:
        return np.argmax((_normalise(query) - mean) @ weights, axis=1)

    return predict


def _normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def few_shot_accuracy(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    examples_per_class: int,
    seed: int = 0,
    trials: int = FEW_SHOT_TRIALS,
    ridge: float = PROBE_RIDGE,
) -> dict | None:
    """Median accuracy over `trials` balanced k-shot fits, tested on the examples not drawn.

    Only classes with more than k examples take part (each needs at least one test example). Returns
    None when fewer than two classes qualify.
    """
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    labels = np.asarray(labels, dtype=np.int64)
    classes = [c for c in np.unique(labels) if np.sum(labels == c) > examples_per_class]
    if len(classes) < 2:
        return None
    members = {c: np.flatnonzero(labels == c) for c in classes}
    remap = {c: i for i, c in enumerate(classes)}
    accuracies = []
    for trial in range(trials):
        rng = np.random.default_rng([seed, examples_per_class, trial])
        fit, test = [], []
        for c in classes:
            chosen = rng.permutation(members[c])
            fit.append(chosen[:examples_per_class])
            test.append(chosen[examples_per_class:])
        fit, test = np.concatenate(fit), np.concatenate(test)
        fit_labels = np.array([remap[c] for c in labels[fit]])
        test_labels = np.array([remap[c] for c in labels[test]])
        predict = fit_ridge_classifier(features[fit], fit_labels, len(classes), ridge)
        accuracies.append(float(np.mean(predict(features[test]) == test_labels)))
    return {
        "examples_per_class": int(examples_per_class),
        "accuracy": float(np.median(accuracies)),
        "num_classes": len(classes),
        "num_test_examples": int(len(test)),
        "trials": trials,
    }


def few_shot_probe(
    features,
    labels,
    examples_per_class=FEW_SHOT_EXAMPLES_PER_CLASS,
    seed: int = 0,
    min_test_examples: int = PROBE_MIN_TEST_EXAMPLES,
) -> list[dict]:
    """`few_shot_accuracy` for each k on one set of classes, so that the accuracies of different k compare.

    The set is the classes with more than the largest k examples (each needs a test example). A k whose
    fits would be tested on fewer than two classes or fewer than `min_test_examples` images is not a
    result: the largest k is left out and the set chosen again for the next (smaller k leave more test
    images). Every entry carries its `num_test_examples`.
    """
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    labels = np.asarray(labels, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    shots = sorted(examples_per_class)
    while shots:
        qualifying = counts > shots[-1]
        if qualifying.sum() >= 2 and (counts[qualifying] - shots[-1]).sum() >= min_test_examples:
            break
        shots.pop()
    if not shots:
        return []
    keep = np.isin(labels, classes[counts > shots[-1]])
    return [few_shot_accuracy(features[keep], labels[keep], k, seed=seed) for k in examples_per_class if k in shots]
