"""A VTAB-1k run's results as the paper reports them: per task, per group and the mean (BiT paper §3.2, Fig. 3).

`vtab_results.json` in the run's output folder holds every finished task (rewritten atomically after each one, so a
result is never lost), the group means and the mean over the run's tasks. The VTAB-1k score of the paper (the mean
top-1 accuracy over the 19 tasks, BiT-L 76.65) is reported as `vtab_1k_score` only when the run holds all 19
registry tasks evaluated on their test splits. `results_table` renders the Markdown table and `save_accuracy_plot`
the bar chart (Fig. 3's group bars beside every task's; matplotlib is optional, `pip install bit-transfer[plots]`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from modeling_bit.file_utils import atomic_write_bytes, atomic_write_json

from .registry import GROUPS, REGISTRY, VtabTask

logger = logging.getLogger(__name__)

RESULTS_FILE = "vtab_results.json"
PLOT_FILE = "vtab_accuracy.png"
FIGURE_DPI = 100
# Bar colours by group (the rest: grey), and the mean's.
GROUP_COLOURS = {"natural": "#4C72B0", "specialized": "#DD8452", "structured": "#55A868"}
OTHER_COLOUR, MEAN_COLOUR = "#8C8C8C", "#333333"


@dataclasses.dataclass
class TaskResult:
    """One finished task: its accuracy (the median over trials), where it came from and how much it saw."""

    group: str
    accuracy: float
    trials: list[float]
    evaluation_split: str
    source: dict
    num_train_examples: int | None
    num_eval_examples: int | None
    unreadable_images: int
    folder: str
    confirmed: bool = True
    top_5_accuracy: float | None = None


@dataclasses.dataclass
class VtabResults:
    """The run's record (`vtab_results.json`): its settings and every finished task, in run order."""

    model: str
    protocol: str
    tasks: dict[str, TaskResult] = dataclasses.field(default_factory=dict)
    planned: list[str] = dataclasses.field(default_factory=list)

    def group_means(self) -> dict[str, dict]:
        """{group: {"mean", "tasks", "of"}}: the paper's groups first, then any other group, in run order."""
        groups = [group for group in GROUPS if any(result.group == group for result in self.tasks.values())]
        groups += [result.group for result in self.tasks.values() if result.group not in groups]
        summary = {}
        for group in dict.fromkeys(groups):
            accuracies = [result.accuracy for result in self.tasks.values() if result.group == group]
            summary[group] = {"mean": statistics.fmean(accuracies), "tasks": len(accuracies)}
        return summary

    @property
    def mean(self) -> float | None:
        accuracies = [result.accuracy for result in self.tasks.values()]
        return statistics.fmean(accuracies) if accuracies else None

    @property
    def is_full_vtab(self) -> bool:
        """All 19 registry tasks, each from its registry source, evaluated on its test split."""
        registry = {task.name: task for task in REGISTRY}
        return (
            self.protocol == "final"
            and set(self.tasks) == set(registry)
            and all(self.tasks[name].source.get("name") == registry[name].source.dataset for name in registry)
        )

    def to_dict(self) -> dict:
        record = {
            "model": self.model,
            "protocol": self.protocol,
            "tasks": {name: dataclasses.asdict(result) for name, result in self.tasks.items()},
            "groups": self.group_means(),
            "mean": self.mean,
            "planned_tasks": list(self.planned),
            "missing_tasks": [name for name in self.planned if name not in self.tasks],
        }
        if self.is_full_vtab:
            record["vtab_1k_score"] = self.mean
        return record

    def save(self, folder: str | os.PathLike) -> Path:
        return atomic_write_json(Path(folder) / RESULTS_FILE, self.to_dict())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> VtabResults | None:
        path = Path(folder) / RESULTS_FILE
        try:
            record = json.loads(path.read_text())
            tasks = {name: TaskResult(**result) for name, result in record["tasks"].items()}
            return cls(record["model"], record["protocol"], tasks, list(record.get("planned_tasks", [])))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _trials(result: TaskResult) -> str:
    if len(result.trials) < 2:
        return ""
    return f" (median of {len(result.trials)}: {percent(min(result.trials))}-{percent(max(result.trials))})"


def tasks_phrase(count: int) -> str:
    return f"{count} task" + ("" if count == 1 else "s")


def results_table(results: VtabResults, tasks: Sequence[VtabTask] = ()) -> str:
    """The Markdown table: every task by group, each group's mean, the mean over the tasks."""
    confirmed = {task.name: task.confirmed for task in tasks}
    lines = ["| task | group | top-1 accuracy |", "|---|---|---|"]
    groups = results.group_means()
    for group in groups:
        for name, result in results.tasks.items():
            if result.group == group:
                mark = "" if confirmed.get(name, result.confirmed) else " (source unconfirmed)"
                lines.append(f"| {name}{mark} | {group} | {percent(result.accuracy)}{_trials(result)} |")
    for group, summary in groups.items():
        lines.append(f"| **{group}** mean ({tasks_phrase(summary['tasks'])}) | | **{percent(summary['mean'])}** |")
    label = "VTAB-1k score" if results.is_full_vtab else "mean"
    lines.append(f"| **{label}** ({tasks_phrase(len(results.tasks))}) | | **{percent(results.mean)}** |")
    return "\n".join(lines)


# --- The bar chart ---------------------------------------------------------------------------------------------


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def save_accuracy_plot(results: VtabResults, folder: str | os.PathLike) -> Path | None:
    """`vtab_accuracy.png` in `folder`: left, the mean and each group's mean (as the paper's Fig. 3); right, every
    task's accuracy coloured by group. None (and an earlier plot removed) without matplotlib or results."""
    path = Path(folder) / PLOT_FILE
    loaded = _matplotlib()
    if loaded is None or not results.tasks:
        if loaded is None:
            logger.info("matplotlib is not installed: no %s (pip install bit-transfer[plots]).", PLOT_FILE)
        path.unlink(missing_ok=True)
        return None
    figure_class, canvas_class = loaded
    groups = results.group_means()
    names = list(results.tasks)
    bars = 1 + len(groups) + len(names)
    figure = figure_class(figsize=(2.5 + 0.5 * bars, 4.5), dpi=FIGURE_DPI, layout="constrained")
    summary_axes, task_axes = figure.subplots(1, 2, width_ratios=[1 + len(groups), max(2, len(names))])
    labels = [f"mean ({len(names)})"] + [f"{group} ({summary['tasks']})" for group, summary in groups.items()]
    values = [results.mean] + [summary["mean"] for summary in groups.values()]
    colours = [MEAN_COLOUR] + [GROUP_COLOURS.get(group, OTHER_COLOUR) for group in groups]
    summary_axes.bar(range(len(values)), [100 * value for value in values], color=colours)
    summary_axes.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=8)
    summary_axes.set_title("VTAB-1k: mean top-1 accuracy", fontsize=10)
    task_values = [100 * results.tasks[name].accuracy for name in names]
    task_axes.bar(
        range(len(names)),
        task_values,
        color=[GROUP_COLOURS.get(results.tasks[name].group, OTHER_COLOUR) for name in names],
    )
    task_axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    task_axes.set_title("per task", fontsize=10)
    for axes, heights in ((summary_axes, values), (task_axes, [results.tasks[name].accuracy for name in names])):
        axes.set_ylim(0, 100)
        axes.set_ylabel("top-1 accuracy (%)")
        for position, height in enumerate(heights):
            axes.text(position, 100 * height + 1, f"{100 * height:.1f}", ha="center", fontsize=7)
    buffer = io.BytesIO()
    canvas_class(figure).print_png(buffer)
    return atomic_write_bytes(path, buffer.getvalue())
