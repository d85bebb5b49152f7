"""What a run reports: the announcement, the training log, throughput, the progress bar, unreadable images.

`O/training_log.jsonl` gets one JSON line per --logging-steps, written in a single append so that a kill
leaves at worst one torn last line, which a resume drops (`read_training_log`) before cutting the log back
to its checkpoint's step.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object

from image_data import InputError, UnreadableImages
from modeling_bit.file_utils import atomic_write_text

from .recipe import SCHEDULES, RunSchedule

logger = logging.getLogger(__name__)


def differences_from_paper(run: RunSchedule, max_steps: int | None) -> list[str]:
    """What this run changes in the paper's recipe, one line each."""
    recipe, schedule = run.recipe, run.schedule
    differences = recipe.differences_from_paper()
    if max_steps is not None:
        decays = "/".join(f"{epoch:g}" for epoch in recipe.decay_epochs)
        differences.append(
            f"length: {schedule.total_steps} steps from --max-steps (paper: {recipe.epochs:g} epochs); the decays after "
            f"epochs {decays} of {recipe.epochs:g} fall at the same fractions of the steps: "
            f"{'/'.join(str(step) for step in schedule.decay_steps)}"
        )
    if run.warmup_note is not None:
        differences.append(run.warmup_note)
    return differences


def announcement(
    preset: str, run: RunSchedule, source, per_device_batch_size: int, num_processes: int, accumulation: int, max_steps
) -> str:
    recipe, schedule = run.recipe, run.schedule
    lines = [
        f"BiT upstream pre-training: {preset} at {recipe.image_size} px, {source.labels.num_classes} classes"
        f" ({'multi-label, sigmoid loss' if source.labels.multi_label else 'softmax cross-entropy'}), "
        f"{source.num_train_examples if source.num_train_examples is not None else 'streamed'} training examples.",
        f"Global batch {recipe.global_batch_size} = {per_device_batch_size} per device x {num_processes} "
        f"process(es) x {accumulation} accumulation step(s); peak lr {recipe.peak_learning_rate:g}; "
        f"{schedule.total_steps} steps, warmup {schedule.warmup_steps}, decays at steps {list(schedule.decay_steps)}.",
    ]
    differences = differences_from_paper(run, max_steps)
    if differences:
        lines.append(
            f"Differs from the paper's {recipe.schedule} recipe ({SCHEDULES[recipe.schedule].epochs:g} epochs):"
        )
        lines.extend(f"  - {line}" for line in differences)
    else:
        lines.append(f"The paper's {recipe.schedule} recipe, unmodified.")
    return "\n".join(lines)


class Throughput:
    """Images per second, seconds per optimizer step and the share of the time spent waiting for batches, since
    the previous report."""

    def __init__(self):
        self.since, self.images, self.steps, self.waiting = time.perf_counter(), 0, 0, 0.0

    def add_step(self, images: int) -> None:
        self.images += images
        self.steps += 1

    def add_data_wait(self, seconds: float) -> None:
        """Time the loop spent waiting for the DataLoader's next batch (workers behind, or the copy to the device)."""
        self.waiting += seconds

    def report(self) -> tuple[float, float, float]:
        """(images per second, seconds per step, fraction of the time waiting for data) over the steps since the
        previous report."""
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        rates = self.images / elapsed, elapsed / max(self.steps, 1), min(self.waiting / elapsed, 1.0)
        self.since, self.images, self.steps, self.waiting = now, 0, 0, 0.0
        return rates


def log_entry(
    step: int,
    loss: float,
    learning_rate: float,
    throughput: Throughput,
    num_processes: int,
    total_steps: int,
    epoch: float | None,
    unreadable_images: int,
) -> dict:
    """One line of the training log (also what the trackers get)."""
    images_per_second, seconds_per_step, data_wait_fraction = throughput.report()
    return {
        "step": step,
        "loss": loss,
        "learning_rate": learning_rate,
        "images_per_second": images_per_second,
        "images_per_second_per_device": images_per_second / num_processes,
        # A loader that keeps up hands over prepared batches at once; a large share means too few workers.
        "data_wait_fraction": data_wait_fraction,
        # From the steps since the previous log entry (probes and checkpoints included), not the whole run.
        "eta_seconds": (total_steps - step) * seconds_per_step,
        "epoch": epoch,
        "unreadable_images": unreadable_images,
    }


def progress_postfix(metrics: dict, learning_rate: float) -> dict:
    postfix = {"lr": f"{learning_rate:.3g}"}
    if "loss" in metrics:
        postfix["loss"] = f"{metrics['loss']:.4f}"
        postfix["img/s/dev"] = f"{metrics['images_per_second_per_device']:.0f}"
        postfix["img/s"] = f"{metrics['images_per_second']:.0f}"
        postfix["eta"] = str(datetime.timedelta(seconds=round(metrics["eta_seconds"])))
    return postfix


class RunUnreadableImages:
    """The run's unreadable images over all processes: each distinct image counted once (`image_data.unreadable`).

    Processes exchange names only when one of them met a new unreadable image since the last exchange (one
    small reduction per log entry otherwise), so every process knows the same set.
    """

    def __init__(self, names=()):
        self.known = UnreadableImages(names)
        self._new: list[str] = []

    def add(self, names: list[str]) -> None:
        self._new.extend(name for name in names if name not in self.known)

    def synchronise(self, accelerator) -> UnreadableImages:
        """Every process's names merged (all processes must call this at the same point)."""
        if accelerator.num_processes == 1:
            self.known.add(self._new)
        else:
            pending = torch.tensor(len(self._new), device=accelerator.device)
            if int(accelerator.reduce(pending, reduction="sum").item()):
                for names in gather_object([self._new]):
                    self.known.add(names)
        self._new = []
        return self.known

    def record(self, accelerator) -> dict:
        """For progress.json and bit_pretraining.json: the count and the names (all processes must call this)."""
        known = self.synchronise(accelerator)
        return {"count": len(known), "names": known.names()}


def read_training_log(path: Path) -> list[dict]:
    """The entries of a training log; a torn last line (the process killed mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    # Every complete entry ends with a newline, so the last piece is empty unless the final write was torn.
    complete, torn = lines[:-1], lines[-1]
    entries = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError as error:
            raise InputError(
                f"{path} line {number} is not a JSON object ({error}): the log was edited or damaged; repair or delete "
                "that line (the checkpoints do not depend on the log)."
            ) from error
    if torn.strip():
        logger.warning("%s: dropped an incomplete last line (the run was stopped while writing it).", path)
    return entries


def truncate_training_log(path: Path, last_step: int) -> list[dict]:
    """Keep the log entries up to `last_step`: a resumed run writes again what came after its checkpoint."""
    # A run starting at step 0 replaces whatever an earlier run left, without reading it.
    kept = [entry for entry in read_training_log(path) if entry["step"] <= last_step] if last_step > 0 else []
    if Path(path).exists():
        atomic_write_text(path, "".join(json.dumps(entry) + "\n" for entry in kept))
    return kept


def append_training_log(path: Path, entry: dict) -> None:
    """Append one line in a single write, so a kill leaves at worst one torn last line (`read_training_log`)."""
    line = (json.dumps(entry) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(descriptor, line)
        while written < len(line):  # only on a full disk or a signal: finish the same line
            written += os.write(descriptor, line[written:])
    finally:
        os.close(descriptor)


def resume_training_log(path: Path, step: int) -> float:
    """Cut the log back to `step` (a run resumed there writes the rest again); the last logged loss (NaN: none)."""
    losses = [entry["loss"] for entry in truncate_training_log(path, step) if "loss" in entry]
    return losses[-1] if losses else float("nan")
