"""Pieces of the pre-training loop: the upstream loss, the head init, checkpoints, the training log."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from modeling_bit.file_utils import atomic_write_json, atomic_write_text

from .errors import InputError

CHECKPOINTS_FOLDER = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
PROGRESS_FILE = "progress.json"  # written last into a checkpoint: its presence marks the checkpoint complete
TRAINING_LOG_FILE = "training_log.jsonl"
PROBE_RESULTS_FILE = "probe_results.json"

logger = logging.getLogger(__name__)


def upstream_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, multi_label: bool
) -> torch.Tensor:
    """Mean over the readable examples of the per-example upstream loss.

    Single-label: softmax cross-entropy. Multi-label: per-class sigmoid cross-entropy summed over classes
    (BIT_RECIPE.md: JFT's per-class binary loss). Summing over classes keeps each class's gradient
    independent of the number of classes; a mean would shrink it 21,843-fold on ImageNet-21k. `weights` is
    1 for readable images and 0 for the blanks that stand in for unreadable ones.
    """
    logits = logits.float()
    if multi_label:
        per_example = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").sum(dim=1)
    else:
        per_example = F.cross_entropy(logits, labels, reduction="none")
    return (per_example * weights).sum() / weights.sum().clamp(min=1.0)


def init_multi_label_head(model, bias: float) -> None:
    """Start every class at sigmoid(bias) (BIT_RECIPE.md: e.g. -10), so the initial sigmoid loss is sane."""
    with torch.no_grad():
        model.classifier[-1].bias.fill_(bias)


# --- Checkpoints ---------------------------------------------------------------------------------------


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_FOLDER / f"step-{step:08d}"


def completed_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first. Half-written ones are never listed."""
    folder = Path(output_dir) / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / PROGRESS_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Every `step-N` folder of `output_dir`, complete or not (a save never overwrites one)."""
    folder = Path(output_dir) / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if CHECKPOINT_PATTERN.match(path.name))


def resolve_checkpoint(output_dir: Path, requested: str) -> Path | None:
    """`latest` -> the newest complete checkpoint of `output_dir` (None if there is none yet); else a path."""
    if requested == "latest":
        checkpoints = completed_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(requested)
    if not (path / PROGRESS_FILE).is_file():
        raise InputError(
            f"--resume-from-checkpoint {requested}: not a complete checkpoint (expected a folder with {PROGRESS_FILE}, "
            f"as written under {Path(output_dir) / CHECKPOINTS_FOLDER}/step-NNNNNNNN)."
        )
    return path


def read_progress(checkpoint: Path) -> dict:
    path = Path(checkpoint) / PROGRESS_FILE
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(
            f"{path} cannot be read as JSON ({error}): the checkpoint is damaged. Resume from an earlier checkpoint "
            f"(--resume-from-checkpoint {Path(checkpoint).parent}/step-NNNNNNNN) or delete this one."
        ) from error
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int):
        raise InputError(
            f"{path} is not a checkpoint's progress record (expected a JSON object with an integer 'step'): the "
            "checkpoint is damaged. Resume from an earlier checkpoint or delete this one."
        )
    return progress


def save_checkpoint(accelerator, output_dir: Path, step: int, progress: dict, keep: int) -> Path:
    """`accelerator.save_state` into a staging folder, then rename it into place; keep the newest `keep`.

    Every process takes part (each saves its RNG state; FSDP saves shards). A kill at any moment leaves
    either the previous checkpoints or the new one complete, never a half-written folder under its name.
    """
    final = checkpoint_folder(output_dir, step)
    staging = final.with_name(f".{final.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if not final.exists():
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(staging / PROGRESS_FILE, progress)
            os.replace(staging, final)
            _fsync_directory(final.parent)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        for _, old in completed_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- Logs --------------------------------------------------------------------------------------------------


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
