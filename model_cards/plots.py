"""PNG plots next to the card: training loss and learning rate, few-shot accuracy.

`plan_plots` decides which plots a folder's records support (nothing is drawn yet, so a card can be checked before
anything is written); `save_plots` draws them. A plot is planned only when it shows more than the card's tables:
a fine-tuned folder's trials (one number of examples per class) are drawn trial by trial, and pre-training's probe
is drawn against examples per class and against steps only where there are several of each.

matplotlib is optional (`pip install bit-transfer[plots]`) and imported only here, lazily. It draws through its
Agg canvas directly (no pyplot, so no global backend or figure state is touched). Without matplotlib no plot is
drawn, plot files left by an earlier render are removed (they could describe older numbers), and the card
embeds none.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from modeling_bit.file_utils import atomic_write_bytes

from .facts import FolderFacts
from .results import TrainingCurve, Trials, few_shot_trials, logged_training_curve, probe_results_by_step

logger = logging.getLogger(__name__)

TRAINING_CURVES_FILE = "training_curves.png"
FEW_SHOT_FILE = "few_shot_accuracy.png"
PROBE_FILE = "probe_accuracy.png"
PLOT_FILES = (TRAINING_CURVES_FILE, FEW_SHOT_FILE, PROBE_FILE)

FIGURE_DPI = 100
FEW_POINTS = 20  # fewer logged points than this: mark each one


@dataclass(frozen=True)
class Plot:
    file: str  # relative to the folder, as the card embeds it
    alt: str
    caption: str
    figure: Callable = field(compare=False, repr=False)  # () -> matplotlib Figure


def plan_plots(facts: FolderFacts) -> list[Plot]:
    """The plots this folder's records support (none without matplotlib); nothing is drawn or written."""
    plots = []
    curve = logged_training_curve(facts)
    if curve.steps:
        plots.append(
            Plot(
                TRAINING_CURVES_FILE,
                "Training loss and learning rate by step",
                "Training loss and learning rate (log scale) at every logged step.",
                partial(training_curves_figure, curve),
            )
        )
    trials = few_shot_trials(facts)
    if trials is not None:
        plots.append(
            Plot(
                FEW_SHOT_FILE,
                "Accuracy of every fine-tuning trial",
                "Accuracy of every trial (the filled point is the trial whose weights this folder holds), "
                "their median (line) and range (band).",
                partial(trials_figure, trials),
            )
        )
    by_step = probe_results_by_step(facts)
    if _probe_panels(by_step):
        plots.append(
            Plot(
                PROBE_FILE,
                "Few-shot linear-probe accuracy",
                "Few-shot linear-probe accuracy on held-out images: by examples per class after the last "
                "probed step, and over the run.",
                partial(probe_figure, by_step),
            )
        )
    if plots and not _matplotlib_available():
        logger.info("matplotlib is not installed (pip install bit-transfer[plots]): the card has no plots.")
        return []
    return plots


def save_plots(folder: Path, plots: list[Plot]) -> None:
    """Draw `plots` into `folder` (atomically) and remove plot files of an earlier render that are not among them."""
    for plot in plots:
        buffer = io.BytesIO()
        plot.figure().savefig(buffer, format="png", dpi=FIGURE_DPI)
        atomic_write_bytes(folder / plot.file, buffer.getvalue())
    drawn = {plot.file for plot in plots}
    for name in PLOT_FILES:
        if name not in drawn:
            (folder / name).unlink(missing_ok=True)


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401  (the figures import what they use)
    except ImportError:
        return False
    return True


def _probe_panels(by_step: dict[int, list[dict]]) -> list[str]:
    """ "shots" when the last probed step has several examples-per-class values, "steps" when several steps were
    probed; none for a single number, which the card's table already shows."""
    final_shots = {entry["examples_per_class"] for entry in by_step[max(by_step)]} if by_step else set()
    return [name for name, wanted in (("shots", len(final_shots) > 1), ("steps", len(by_step) > 1)) if wanted]


def _new_figure(width: float, height: float, columns: int = 1, rows: int = 1, **kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, squeeze=False, **kwargs)


def _integer_steps(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def training_curves_figure(curve: TrainingCurve):
    """Loss (linear) over learning rate (log: warmup and the ×0.1 step decays are equal-height steps)."""
    figure, axes = _new_figure(6.4, 4.8, rows=2, sharex=True)
    loss_axes, lr_axes = axes[0][0], axes[1][0]
    marker = "o" if len(curve.steps) < FEW_POINTS else None
    loss_axes.plot(curve.steps, curve.losses, marker=marker)
    loss_axes.set_ylabel("training loss")
    loss_axes.grid(alpha=0.3)
    # Zero (the first warmup step) has no place on a log axis; the remaining points still show the ramp.
    rates = [(step, rate) for step, rate in zip(curve.lr_steps, curve.learning_rates, strict=True) if rate > 0]
    if rates:
        lr_axes.plot([step for step, _ in rates], [rate for _, rate in rates], color="tab:orange", marker=marker)
        lr_axes.set_yscale("log")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("optimizer step")
    _integer_steps(lr_axes)
    lr_axes.grid(alpha=0.3, which="both")
    figure.suptitle("Training loss and learning rate (as logged)")
    return figure


def trials_figure(trials: Trials):
    """Every trial's accuracy as a point, their median as a line and their min–max range as a band."""
    figure, axes = _new_figure(5.6, 4.0)
    plot_axes = axes[0][0]
    numbers = list(range(1, len(trials.accuracies) + 1))
    plot_axes.axhspan(trials.minimum, trials.maximum, color="tab:blue", alpha=0.12, label="min–max")
    plot_axes.axhline(trials.median, color="black", linewidth=1.5, label=f"median {100 * trials.median:.2f}%")
    plot_axes.scatter(numbers, trials.accuracies, facecolors="none", edgecolors="tab:blue", s=50, label="trial")
    if trials.saved_trial is not None and 0 <= trials.saved_trial < len(trials.accuracies):
        plot_axes.scatter(
            [trials.saved_trial + 1],
            [trials.accuracies[trials.saved_trial]],
            color="tab:blue",
            s=50,
            label="weights in this folder",
        )
    plot_axes.set_xticks(numbers)
    plot_axes.set_xlim(0.5, len(numbers) + 0.5)
    plot_axes.set_xlabel("trial")
    plot_axes.set_ylabel("accuracy")
    plot_axes.set_ylim(0, 1.02)
    plot_axes.grid(alpha=0.3, axis="y")
    plot_axes.legend(loc="lower right")
    shots = f"{trials.examples_per_class} examples per class" if trials.examples_per_class else "whole training set"
    plot_axes.set_title(f"{len(trials.accuracies)} fine-tuning trials, {shots}")
    return figure


def probe_figure(by_step: dict[int, list[dict]]):
    """Accuracy against examples per class after the last step (when several were probed) and against steps (when
    several were probed)."""
    shots = sorted({entry["examples_per_class"] for entries in by_step.values() for entry in entries})
    panels = _probe_panels(by_step)
    figure, axes = _new_figure(5.0 * len(panels), 4.0, columns=len(panels))
    for panel, plot_axes in zip(panels, axes[0], strict=True):
        plot_axes.set_ylim(0, 1.02)
        plot_axes.grid(alpha=0.3)
        plot_axes.set_ylabel("linear-probe accuracy (median of trials)")
        if panel == "shots":
            final_step = max(by_step)
            final = sorted(by_step[final_step], key=lambda entry: entry["examples_per_class"])
            plot_axes.plot([e["examples_per_class"] for e in final], [e["accuracy"] for e in final], marker="o")
            plot_axes.set_xscale("log")
            plot_axes.minorticks_off()
            plot_axes.set_xticks(
                [e["examples_per_class"] for e in final], labels=[str(e["examples_per_class"]) for e in final]
            )
            plot_axes.set_xlabel("examples per class")
            plot_axes.set_title(f"After step {final_step}")
        else:
            for k in shots:
                points = [
                    (step, e["accuracy"])
                    for step, entries in sorted(by_step.items())
                    for e in entries
                    if e["examples_per_class"] == k
                ]
                plot_axes.plot([s for s, _ in points], [a for _, a in points], marker="o", label=f"{k}-shot")
            plot_axes.set_xlabel("optimizer step")
            _integer_steps(plot_axes)
            plot_axes.set_title("During pre-training")
            plot_axes.legend(loc="lower right")
    return figure


__all__ = ["PLOT_FILES", "Plot", "plan_plots", "probe_figure", "save_plots", "training_curves_figure", "trials_figure"]
