"""PNG plots next to the card: training loss and learning rate, few-shot accuracy.

matplotlib is optional (`pip install bit-transfer[plots]`) and imported only here, lazily. It draws through its
Agg canvas directly (no pyplot, so no global backend or figure state is touched). Without matplotlib no plot is
drawn, plot files left by an earlier render are removed (they could describe older numbers), and the card
embeds none.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

from modeling_bit.file_utils import atomic_write_bytes

from .facts import FolderFacts
from .results import few_shot_trials, logged_training_curve, probe_results_by_step

logger = logging.getLogger(__name__)

TRAINING_CURVES_FILE = "training_curves.png"
FEW_SHOT_FILE = "few_shot_accuracy.png"
PROBE_FILE = "probe_accuracy.png"
PLOT_FILES = (TRAINING_CURVES_FILE, FEW_SHOT_FILE, PROBE_FILE)

FIGURE_DPI = 100


@dataclass(frozen=True)
class Plot:
    file: str  # relative to the folder, as the card embeds it
    alt: str
    caption: str


def draw_plots(facts: FolderFacts) -> list[Plot]:
    """Draw the plots this folder's records support into the folder; return those drawn."""
    curve, trials, by_step = logged_training_curve(facts), few_shot_trials(facts), probe_results_by_step(facts)
    if trials is not None and trials.examples_per_class is None:
        trials = None  # trials on the whole training set: nothing to plot against examples per class
    if not (curve.steps or trials or by_step):  # e.g. a conversion: matplotlib is not even imported
        _remove_stale(facts.folder, keep=())
        return []
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logger.info("matplotlib is not installed (pip install bit-transfer[plots]): the card has no plots.")
        _remove_stale(facts.folder, keep=())
        return []

    def new_figure(width: float, height: float, rows: int = 1, columns: int = 1, **kwargs):
        figure = Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")
        FigureCanvasAgg(figure)
        return figure, figure.subplots(rows, columns, squeeze=False, **kwargs)

    drawn = []
    if curve.steps:
        figure, axes = new_figure(6.4, 4.8, rows=2, sharex=True)
        loss_axes, lr_axes = axes[0][0], axes[1][0]
        marker = "o" if len(curve.steps) < 20 else None  # few logged points: show where they are
        loss_axes.plot(curve.steps, curve.losses, marker=marker)
        loss_axes.set_ylabel("training loss")
        loss_axes.grid(alpha=0.3)
        if curve.learning_rates:
            lr_axes.plot(curve.lr_steps, curve.learning_rates, color="tab:orange", marker=marker)
        lr_axes.set_ylabel("learning rate")
        lr_axes.set_xlabel("optimizer step")
        lr_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        lr_axes.grid(alpha=0.3)
        figure.suptitle("Training loss and learning rate (as logged)")
        drawn.append(_save(figure, facts.folder, TRAINING_CURVES_FILE, "Training loss and learning rate by step",
                           "Training loss and learning rate at every logged step."))

    if trials is not None:
        figure, axes = new_figure(5.6, 4.0)
        plot_axes = axes[0][0]
        k = trials.examples_per_class
        plot_axes.scatter([k] * len(trials.accuracies), trials.accuracies, alpha=0.6, label="trial")
        plot_axes.errorbar([k], [trials.median], yerr=[[trials.median - trials.minimum], [trials.maximum - trials.median]],
                           fmt="s", color="black", capsize=6, label="median (bar: min–max)")
        plot_axes.set_xscale("log")
        plot_axes.minorticks_off()
        plot_axes.set_xticks([k], labels=[str(k)])
        plot_axes.set_xlabel("examples per class")
        plot_axes.set_ylabel("accuracy")
        plot_axes.set_ylim(0, 1.02)
        plot_axes.grid(alpha=0.3)
        plot_axes.legend(loc="lower right")
        plot_axes.set_title(f"Few-shot accuracy, {len(trials.accuracies)} trials")
        drawn.append(_save(figure, facts.folder, FEW_SHOT_FILE, "Few-shot accuracy versus examples per class",
                           "Accuracy of every trial at this number of examples per class, and their median."))

    if by_step:
        figure, axes = new_figure(10.0, 4.0, columns=2)
        final_step = max(by_step)
        final = sorted(by_step[final_step], key=lambda entry: entry["examples_per_class"])
        shots_axes, steps_axes = axes[0][0], axes[0][1]
        shots_axes.plot([e["examples_per_class"] for e in final], [e["accuracy"] for e in final], marker="o")
        shots_axes.set_xscale("log")
        shots_axes.minorticks_off()
        shots_axes.set_xticks([e["examples_per_class"] for e in final], labels=[str(e["examples_per_class"]) for e in final])
        shots_axes.set_xlabel("examples per class")
        shots_axes.set_ylabel("linear-probe accuracy (median of trials)")
        shots_axes.set_ylim(0, 1.02)
        shots_axes.set_title(f"After step {final_step}")
        shots_axes.grid(alpha=0.3)
        for k in sorted({e["examples_per_class"] for entries in by_step.values() for e in entries}):
            points = [(step, e["accuracy"]) for step, entries in sorted(by_step.items()) for e in entries
                      if e["examples_per_class"] == k]
            steps_axes.plot([s for s, _ in points], [a for _, a in points], marker="o", label=f"{k}-shot")
        steps_axes.set_xlabel("optimizer step")
        steps_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        steps_axes.set_ylim(0, 1.02)
        steps_axes.set_title("During pre-training")
        steps_axes.grid(alpha=0.3)
        steps_axes.legend(loc="lower right")
        drawn.append(_save(figure, facts.folder, PROBE_FILE, "Few-shot linear-probe accuracy",
                           "Few-shot linear-probe accuracy on held-out images: by examples per class after the last "
                           "step (left) and over the run (right)."))

    _remove_stale(facts.folder, keep=[plot.file for plot in drawn])
    return drawn


def _save(figure, folder: Path, name: str, alt: str, caption: str) -> Plot:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    atomic_write_bytes(folder / name, buffer.getvalue())
    return Plot(name, alt, caption)


def _remove_stale(folder: Path, keep) -> None:
    for name in PLOT_FILES:
        if name not in keep:
            (folder / name).unlink(missing_ok=True)


__all__ = ["PLOT_FILES", "Plot", "draw_plots"]
