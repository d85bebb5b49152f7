"""What a fine-tuning run shows while it trains: one progress bar per trial, log entries with numbers as
numbers, and, after the first steps, the measured time per step with the run's estimated total and peak memory.

`TrialProgress` replaces transformers' `ProgressCallback` / `PrinterCallback` (which print every logged float
as a string) in `BitTrainer` runs made by the fine-tuning engine.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.utils import logging as transformers_logging

logger = logging.getLogger(__name__)

# Steps timed before the estimate is printed (the first step is left out: it pays for start-up work).
STEPS_TIMED_FOR_ESTIMATE = 3
SIGNIFICANT_DIGITS = 4


def as_number(value):
    """A logged value rounded for reading, still a number (ints and non-numbers unchanged)."""
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    return value


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated on `device`, or this process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class _CheckpointsSecondsApart(logging.Filter):
    """transformers orders checkpoints by modification time and, when two are less than a second apart (short
    runs), warns that the filesystem's mtime "may not be reliable": true of neither the filesystem nor the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("mtime may not be reliable")


transformers_logging.get_logger("transformers.trainer_utils").addFilter(_CheckpointsSecondsApart())


@contextlib.contextmanager
def transformers_quiet(*, errors_only: bool = False) -> Iterator[None]:
    """transformers' own progress bars off ("Writing model shards" at every checkpoint, "Loading weights" at every
    load: the trial's bar says where the run is), and with `errors_only` its messages below errors too; the
    previous settings restored afterwards."""
    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    if errors_only:
        transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


class TrialProgress(TrainerCallback):
    """Progress of trial `trial` (from 1) of `trials`, each of the same number of steps.

    The bar's postfix carries the last loss and learning rate and, with several trials, the estimated time
    left for all of them (this trial's remaining steps and the later trials' steps at the measured rate). Log
    entries (in the log history and the trackers either way) are printed with `print_logs`.
    """

    def __init__(self, trial: int = 1, trials: int = 1, device: torch.device | None = None, print_logs: bool = False):
        self.trial, self.trials = trial, trials
        self.print_logs = print_logs
        self.device = device or torch.device("cpu")
        self.bar = None
        self.eval_bar = None
        self._timed_from: tuple[int, float] | None = None
        self._estimated = False
        self._postfix: dict = {}

    def _description(self) -> str:
        return f"Trial {self.trial}/{self.trials}" if self.trials > 1 else "Training"

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc=self._description(),
                unit="step",
                dynamic_ncols=True,
            )
        self._timed_from = None
        self._estimated = False

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.bar.update(state.global_step - self.bar.n)
        now = time.perf_counter()
        if self._timed_from is None:
            self._timed_from = (state.global_step, now)  # after the first step: start-up is behind us
            return
        first_step, started = self._timed_from
        timed = state.global_step - first_step
        seconds_per_step = (now - started) / timed
        left = (state.max_steps - state.global_step + (self.trials - self.trial) * state.max_steps) * seconds_per_step
        if self.trials > self.trial:
            self._postfix["all trials"] = f"{format_duration(left)} left"
            self.bar.set_postfix(self._postfix, refresh=False)
        if not self._estimated and timed >= STEPS_TIMED_FOR_ESTIMATE:
            self._estimated = True
            total = state.max_steps * seconds_per_step
            message = (
                f"Measured {seconds_per_step:.3g} s per step: about {format_duration(total)} for this trial's "
                f"{state.max_steps} steps"
            )
            if self.trials > 1:
                message += f", about {format_duration(total * self.trials)} for all {self.trials} trials"
            gigabytes = peak_memory_bytes(self.device) / 1024**3
            where = "accelerator memory" if self.device.type == "cuda" else "memory (resident)"
            self.bar.write(f"{message}; peak {where} {gigabytes:.2f} GB so far.")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.bar is None or not logs:
            return
        entry = {key: as_number(value) for key, value in logs.items() if key != "total_flos"}
        for key in ("loss", "learning_rate"):
            if key in entry:
                self._postfix[key] = entry[key]
        self.bar.set_postfix(self._postfix, refresh=False)
        if self.print_logs:
            self.bar.write(str(entry))

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.eval_bar is None:
            try:
                total = len(eval_dataloader)
            except TypeError:  # a stream: its length is unknown
                total = None
            self.eval_bar = tqdm(total=total, desc="Evaluating", unit="batch", leave=False, dynamic_ncols=True)
        self.eval_bar.update()

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
