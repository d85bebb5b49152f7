"""Checkpoints and exact resume: atomic saves, the resume signature, and damaged checkpoints explained.

A checkpoint is `accelerator.save_state` (weights, optimizer, each process's RNG state) plus
`progress.json`, written last into a staging folder that is renamed into place: its presence marks the
checkpoint complete. A resume continues exactly only under the run's own data order, schedule and model
(`RESUME_KEYS`: refused when any differs); other settings change only the last bits of the arithmetic
(`EXACTNESS_KEYS`: the resume runs, with a warning).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from accelerate.utils import load as accelerate_load

from image_data import InputError
from modeling_bit.configuration_bit import canonical_preset_name
from modeling_bit.file_utils import atomic_write_json

from .launching import launch_prefix
from .recipe import Recipe

CHECKPOINTS_FOLDER = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
PROGRESS_FILE = "progress.json"  # written last into a checkpoint: its presence marks the checkpoint complete
# What accelerator.save_state writes for a model and an optimizer: one of each set of names (the second and third
# are the torch-pickle and the FSDP sharded forms), and one RNG file per process.
MODEL_STATE_NAMES = ("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp_0")
OPTIMIZER_STATE_NAMES = ("optimizer.bin", "optimizer_0")
RNG_STATE_NAME = "random_states_{process}.pkl"


# --- folders ---------------------------------------------------------------------------------------------------


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


def checkpoints_of_another_run(output_dir: Path, resume_from_checkpoint: str | None, overwrite: bool) -> list[Path]:
    """The checkpoints a fresh run would have to delete (--overwrite-output-dir); refuse to mix runs otherwise.

    A save never replaces a checkpoint folder, so a new run among another run's checkpoints would keep theirs
    and lose its own work.
    """
    if resume_from_checkpoint == "latest":
        return []
    existing = checkpoint_folders(output_dir)
    if resume_from_checkpoint is not None:
        resumed = Path(resume_from_checkpoint).resolve()
        if any(resumed == folder.resolve() for folder in existing):
            return []  # continuing this folder's own run from an earlier checkpoint
    if existing and not overwrite:
        raise InputError(
            f"--output-dir {output_dir} already holds {len(existing)} checkpoint(s) of another run (newest "
            f"{existing[-1].name}). Continue that run with --resume-from-checkpoint latest, choose another "
            "--output-dir, or pass --overwrite-output-dir to delete them."
        )
    return existing


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


# --- saving and loading -----------------------------------------------------------------------------------------


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


def read_progress(checkpoint: Path) -> dict:
    path = Path(checkpoint) / PROGRESS_FILE
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(
            f"{path} cannot be read as JSON ({error}): the checkpoint is damaged. {_earlier(checkpoint)}"
        ) from error
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int):
        raise InputError(
            f"{path} is not a checkpoint's progress record (expected a JSON object with an integer 'step'): the "
            f"checkpoint is damaged. {_earlier(checkpoint)}"
        )
    return progress


def _earlier(checkpoint: Path) -> str:
    return (
        f"Resume from an earlier checkpoint (--resume-from-checkpoint {Path(checkpoint).parent}/step-NNNNNNNN) or "
        "delete this one."
    )


def load_checkpoint(accelerator, checkpoint: Path) -> None:
    """`accelerator.load_state`, after checking that this process's files are there and load safely.

    accelerate itself skips a missing or unreadable RNG file in silence (the resume would not be exact) and
    lets a pickle that `torch.load(weights_only=True)` refuses escape as a traceback: both are refused here,
    naming the file.
    """
    checkpoint = Path(checkpoint)
    rng_file = checkpoint / RNG_STATE_NAME.format(process=accelerator.process_index)
    for names, what in ((MODEL_STATE_NAMES, "the model weights"), (OPTIMIZER_STATE_NAMES, "the optimizer state")):
        if not any((checkpoint / name).exists() for name in names):
            raise InputError(
                f"{checkpoint} is incomplete: {what} ({' or '.join(names)}) are missing; expected the model, optimizer "
                f"and RNG files accelerator.save_state writes. {_earlier(checkpoint)}"
            )
    if not rng_file.is_file():
        raise InputError(
            f"{checkpoint} is incomplete: {rng_file.name}, process {accelerator.process_index}'s RNG state, is missing "
            f"(expected the model, optimizer and RNG files accelerator.save_state writes). {_earlier(checkpoint)}"
        )
    for path in (checkpoint / OPTIMIZER_STATE_NAMES[0], rng_file):
        if path.is_file():
            _check_loads_safely(path, checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # any failure of a file that passed the checks above: still a damaged checkpoint
        raise InputError(
            f"{checkpoint} cannot be restored ({type(error).__name__}: {error}). {_earlier(checkpoint)}"
        ) from error


def _check_loads_safely(path: Path, checkpoint: Path) -> None:
    """Load a torch pickle as accelerate will (weights only: plain tensors and containers, nothing executed);
    tensors are memory-mapped, not read."""
    try:  # torch's zip format can be memory-mapped; accelerate writes the small RNG states as a plain pickle
        accelerate_load(path, map_location="cpu", mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise InputError(
            f"{path} cannot be loaded as a checkpoint file ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "it is damaged, or is not what accelerator.save_state writes (a pickle holding anything but tensors and "
            f"plain containers is refused, never executed). {_earlier(checkpoint)}"
        ) from error


# --- the resume signature ---------------------------------------------------------------------------------------

# What fixes a run's data order, schedule and model, with the flag (or launcher setting) that sets each value.
RESUME_KEYS = {
    "model_preset": "--model-preset",
    "dataset": "--train-dir / --dataset and their options",
    "data_files": "--data-files",
    "image_column": "--image-column",
    "label_column": "--label-column",
    "streaming": "--streaming",
    "validation_split": "--validation-split",
    "validation_examples": "--validation-examples",
    "seed": "--seed",
    "total_steps": "--max-steps / --epochs",
    "decay_steps": "--decay-epochs / --max-steps / --epochs",
    "global_batch_size": "--global-batch-size",
    "per_device_batch_size": "--per-device-batch-size",
    "num_processes": "the launcher's number of processes",
    "gradient_accumulation_steps": "derived: global batch / (per-device batch x processes)",
    "shuffle_buffer_size": "--shuffle-buffer-size",
    "dataloader_num_workers": "--dataloader-num-workers (streaming: workers share the shards)",
    "recipe": "the recipe flags",
}
# What changes only how the same arithmetic is carried out; a resume that changes it warns.
EXACTNESS_KEYS = {
    "intra_op_threads": "intra-op threads (OMP_NUM_THREADS, torch.set_num_threads)",
    "mixed_precision": "--mixed-precision (or the accelerate config's)",
    "channels_last": "--channels-last",
    "gradient_checkpointing": "--gradient-checkpointing",
}
EXACTNESS_NOTE = (
    "The run continues, but its weights will differ from an uninterrupted run's in the last bits (for another "
    "thread count, measured: up to 7.5e-9)"
)


def run_signature(
    arguments, recipe: Recipe, total_steps: int, decay_steps, source, num_processes: int, accumulation: int
) -> dict:
    """The values of `RESUME_KEYS` for this run: a checkpoint continues exactly only under the same values.

    Map-style data is read by position (the examples of a step do not depend on the number of workers), so
    the worker count and shuffle buffer only matter for a stream, where workers own shards.
    """
    data = arguments.data
    signature = {
        "model_preset": canonical_preset_name(arguments.model.model_preset),
        "dataset": source.description,
        "data_files": data.data_files,
        "image_column": source.image_column,
        "label_column": source.label_column,
        "streaming": source.streaming,
        "validation_split": data.validation_split,
        "validation_examples": data.validation_examples,
        "seed": arguments.run.seed,
        "total_steps": total_steps,
        "decay_steps": list(decay_steps),
        "global_batch_size": recipe.global_batch_size,
        "per_device_batch_size": arguments.recipe.per_device_batch_size,
        "num_processes": num_processes,
        "gradient_accumulation_steps": accumulation,
        "recipe": recipe.to_dict(),
    }
    if source.streaming:
        signature["shuffle_buffer_size"] = data.shuffle_buffer_size
        signature["dataloader_num_workers"] = data.dataloader_num_workers
    # The JSON round trip of progress.json turns tuples into lists: compare like with like.
    return json.loads(json.dumps(signature))


def exactness_signature(arguments, accelerator) -> dict:
    """The values of `EXACTNESS_KEYS` for this process."""
    return {
        "intra_op_threads": torch.get_num_threads(),
        "mixed_precision": str(accelerator.mixed_precision),
        "channels_last": arguments.model.channels_last,
        "gradient_checkpointing": arguments.model.gradient_checkpointing,
    }


def check_resumable(progress: dict, signature: dict, checkpoint: Path) -> None:
    """Refuse a resume that would not continue exactly, naming each changed value and the checkpoint's."""
    changed = []
    for key, value in signature.items():
        saved = progress.get(key, "(not recorded)")
        if key == "recipe" and isinstance(saved, dict):
            for name in value:
                if saved.get(name) != value[name]:
                    change = f"recipe {name} is {value[name]!r} now, the checkpoint used {saved.get(name)!r}"
                    if name == "warmup_steps" and isinstance(saved.get(name), int):
                        # Runs given a length used to keep the paper's 5,000 warmup steps; they now scale them.
                        change += f" (--warmup-steps {saved[name]} continues with the checkpoint's)"
                    changed.append(change)
        elif saved != value:
            change = f"{key} ({RESUME_KEYS[key]}) is {value!r} now, the checkpoint used {saved!r}"
            if key == "num_processes" and isinstance(saved, int):
                change += f" (relaunch with {' '.join(launch_prefix(saved))} pretraining/pretrain.py ...)"
            changed.append(change)
    if changed:
        raise InputError(
            f"Cannot continue {checkpoint} exactly: " + "; ".join(changed) + ". Resume with the interrupted run's "
            "arguments and launcher, or start a new --output-dir."
        )


def exactness_warning(progress: dict, exactness: dict) -> str | None:
    """What a resume changes among `EXACTNESS_KEYS` (None: nothing), as a warning to print."""
    saved = progress.get("exactness")
    if not isinstance(saved, dict):
        return None  # a checkpoint from before these were recorded: nothing to compare
    changed = [
        f"{EXACTNESS_KEYS[key]} is {value!r} now, the checkpoint's run used {saved[key]!r}"
        for key, value in exactness.items()
        if key in saved and saved[key] != value
    ]
    if not changed:
        return None
    note = EXACTNESS_NOTE
    if any(key == "mixed_precision" and saved.get(key) != value for key, value in exactness.items()):
        note += "; another --mixed-precision changes them by far more (autocast rounds the activations)"
    return "Resuming with " + "; ".join(changed) + f". {note}."


@dataclasses.dataclass
class Resume:
    """Where a run starts: from scratch, or from a checkpoint that continues it exactly."""

    checkpoint: Path | None = None
    progress: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def check(cls, checkpoint: Path | None, signature: dict, exactness: dict, say) -> Resume:
        """Read the checkpoint's progress record; refuse it unless it continues this run exactly, and `say` what
        changes only the last bits."""
        if checkpoint is None:
            return cls()
        progress = read_progress(checkpoint)
        check_resumable(progress, signature, checkpoint)
        warning = exactness_warning(progress, exactness)
        if warning:
            say(f"Warning: {warning}")
        return cls(checkpoint, progress)

    @property
    def step(self) -> int:
        return self.progress.get("step", 0)

    def restore(self, accelerator, streaming: bool) -> tuple[dict[int, dict], list[str]]:
        """Load the checkpoint into the prepared model and optimizer; (this process's stream positions per
        DataLoader worker, the unreadable images met so far)."""
        if self.checkpoint is None:
            return {}, []
        load_checkpoint(accelerator, self.checkpoint)
        positions = {}
        if streaming:
            saved = self.progress["stream_positions"][accelerator.process_index]
            positions = {int(worker): position for worker, position in saved.items()}
        accelerator.print(f"Resumed from {self.checkpoint} at step {self.step}.")
        return positions, self.progress.get("unreadable_images", {}).get("names", [])
