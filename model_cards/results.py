"""The numbers a folder records about its training and evaluation, as plain values (no formatting).

Everything missing, non-numeric or non-finite is left out rather than shown as "None" or "nan": a card says only
what was measured.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from .facts import FolderFacts, FolderKind


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainingCurve:
    steps: list[int]
    losses: list[float]
    lr_steps: list[int]
    learning_rates: list[float]


def logged_training_curve(facts: FolderFacts) -> TrainingCurve:
    """Loss and learning rate at every logged step (HF Trainer's log_history, or the pre-training log).

    Trainer's final summary entry ("train_loss", the mean over the run) is not a step's loss and is skipped.
    """
    if facts.kind not in (FolderKind.FINE_TUNED, FolderKind.PRETRAINED):
        return TrainingCurve([], [], [], [])
    steps, losses, lr_steps, rates = [], [], [], []
    for entry in facts.training_log:
        step = entry.get("step")
        if not finite(step):
            continue
        if finite(entry.get("loss")):
            steps.append(int(step))
            losses.append(float(entry["loss"]))
        if finite(entry.get("learning_rate")):
            lr_steps.append(int(step))
            rates.append(float(entry["learning_rate"]))
    return TrainingCurve(steps, losses, lr_steps, rates)


@dataclass(frozen=True)
class Trials:
    """Repeated fine-tuning runs (the paper's few-shot protocol: k examples per class drawn anew per trial)."""

    examples_per_class: int | None  # None: every trial used the whole training set
    accuracies: list[float]
    median: float
    minimum: float
    maximum: float
    saved_trial: int | None  # index into `accuracies` of the trial whose weights the folder holds


def few_shot_trials(facts: FolderFacts) -> Trials | None:
    """The trials a fine-tuned folder records (`eval_accuracy_trials` & co.), or None for a single run."""
    results = facts.eval_results or {}
    accuracies = results.get("eval_accuracy_trials")
    if facts.kind is not FolderKind.FINE_TUNED or not isinstance(accuracies, list) or len(accuracies) < 2:
        return None
    if not all(finite(value) for value in accuracies):
        return None
    summary = [results.get(key) for key in ("eval_accuracy", "eval_accuracy_min", "eval_accuracy_max")]
    median, minimum, maximum = (
        summary if all(finite(value) for value in summary) else (_median(accuracies), min(accuracies), max(accuracies))
    )
    dataset = (facts.finetune_args or {}).get("dataset") or {}
    k = dataset.get("examples_per_class")
    saved = (facts.all_results or {}).get("saved_trial")  # bit-finetune numbers trials from 1
    return Trials(
        examples_per_class=int(k) if finite(k) else None,
        accuracies=[float(value) for value in accuracies],
        median=float(median),
        minimum=float(minimum),
        maximum=float(maximum),
        saved_trial=int(saved) - 1 if finite(saved) and 1 <= saved <= len(accuracies) else None,
    )


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@dataclass(frozen=True)
class Metric:
    name: str  # "accuracy", "top_5_accuracy", "loss"
    value: float


# eval_results.json keys (HF examples style) this card reports, in display order.
EVALUATION_KEYS = {"eval_accuracy": "accuracy", "eval_top_5_accuracy": "top_5_accuracy", "eval_loss": "loss"}


def evaluation_metrics(facts: FolderFacts) -> list[Metric]:
    """The recorded evaluation metrics of a fine-tuned folder (accuracy is the trials' median when there are trials).

    Top-5 accuracy is left out for five classes or fewer, where it is 100% by construction. The best trial of a
    random search was chosen on images held out of training, so its `eval_*` metrics are the choice's, not an
    evaluation; its evaluation is the test accuracy the search measured afterwards on the run's evaluation data.
    """
    if facts.kind is not FolderKind.FINE_TUNED:
        return []
    if facts.search_results is not None:
        test = facts.search_results.get("test_accuracy")
        return [Metric("accuracy", float(test))] if finite(test) else []
    results = facts.eval_results or {}
    return [
        Metric(name, float(results[key]))
        for key, name in EVALUATION_KEYS.items()
        if finite(results.get(key)) and not (name == "top_5_accuracy" and facts.architecture.num_labels <= 5)
    ]


def probe_results_by_step(facts: FolderFacts) -> dict[int, list[dict]]:
    """Pre-training's few-shot probe results, grouped by step; entries without a finite accuracy are dropped."""
    if facts.kind is not FolderKind.PRETRAINED:
        return {}
    by_step = defaultdict(list)
    for entry in facts.probe_results:
        if finite(entry.get("step")) and finite(entry.get("examples_per_class")) and finite(entry.get("accuracy")):
            by_step[int(entry["step"])].append(entry)
    return dict(by_step)


def final_probe_results(facts: FolderFacts) -> list[dict]:
    """The probe results of the last probed step, by increasing examples per class."""
    by_step = probe_results_by_step(facts)
    if not by_step:
        return []
    return sorted(by_step[max(by_step)], key=lambda entry: entry["examples_per_class"])


__all__ = [
    "Metric",
    "TrainingCurve",
    "Trials",
    "evaluation_metrics",
    "few_shot_trials",
    "final_probe_results",
    "finite",
    "logged_training_curve",
    "probe_results_by_step",
]
