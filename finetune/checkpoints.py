"""Which Trainer checkpoint a resumed trial continues from: the newest complete one.

The Trainer writes `checkpoint-N` in place, file after file (weights, optimizer, scheduler, RNG states, then
`trainer_state.json`), and deletes older checkpoints after it; a kill can land anywhere in between. A
checkpoint is complete when every file a resume reads is there and whole: `trainer_state.json` parses and
names step N; the safetensors weights hold every byte their header promises; the optimizer, scheduler and RNG
files (`torch.save` zip archives, whose central directory is written last) open as archives. Torn checkpoints
newer than the newest complete one are named in the log and removed, so the Trainer never sees them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from modeling_bit.folder_layout import WEIGHTS_FILE, WEIGHTS_INDEX_FILE

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def rng_state_files(processes: int) -> tuple[str, ...]:
    """The RNG files the Trainer writes: one for a single process, one per process otherwise."""
    return ("rng_state.pth",) if processes <= 1 else tuple(f"rng_state_{rank}.pth" for rank in range(processes))


def _safetensors_problem(path: Path) -> str | None:
    try:
        with open(path, "rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
    except (OSError, struct.error, ValueError) as error:
        return f"{path.name} has no readable header ({error})"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if path.stat().st_size < 8 + length + end:
        return f"{path.name} is truncated"
    return None


def _weights_problem(folder: Path) -> str | None:
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            return f"{index.name} is not readable ({error})"
    else:
        shards = [WEIGHTS_FILE]
    for shard in shards:
        if not (folder / shard).is_file():
            return f"{shard} is missing"
        problem = _safetensors_problem(folder / shard)
        if problem:
            return problem
    return None


def checkpoint_problem(folder: str | os.PathLike, *, processes: int = 1, with_optimizer: bool = True) -> str | None:
    """What makes `folder` (a Trainer `checkpoint-N`) unusable for a resume, or None if it is complete."""
    folder = Path(folder)
    match = _CHECKPOINT_NAME.match(folder.name)
    state_file = folder / TRAINER_STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return f"{TRAINER_STATE_FILE} is missing"
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE_FILE} is not readable ({error})"
    if not isinstance(state, dict) or (match and state.get("global_step") != int(match.group(1))):
        return f"{TRAINER_STATE_FILE} does not describe step {match.group(1) if match else '?'}"
    problem = _weights_problem(folder)
    if problem:
        return problem
    archives = (*OPTIMIZER_FILES, *rng_state_files(processes)) if with_optimizer else ()
    for name in archives:
        try:
            with zipfile.ZipFile(folder / name):
                pass
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, zipfile.BadZipFile) as error:
            return f"{name} is incomplete ({error})"
    return None


def checkpoint_folders(trial_dir: Path) -> list[Path]:
    """The trial's `checkpoint-N` folders, newest (highest N) first."""
    if not trial_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in trial_dir.iterdir() if (m := _CHECKPOINT_NAME.match(path.name))]
    return [path for _, path in sorted(found, reverse=True)]


def newest_complete_checkpoint(
    trial_dir: str | os.PathLike, *, processes: int = 1, with_optimizer: bool = True, remove_torn: bool = True
) -> Path | None:
    """The newest complete checkpoint of a trial folder, or None. The torn checkpoints newer than it are logged
    and, with `remove_torn` (the main process), deleted."""
    for folder in checkpoint_folders(Path(trial_dir)):
        problem = checkpoint_problem(folder, processes=processes, with_optimizer=with_optimizer)
        if problem is None:
            return folder
        logger.info(
            "Skipping the torn checkpoint %s (%s): a kill interrupted its writing; removing it.", folder, problem
        )
        if remove_torn:
            shutil.rmtree(folder, ignore_errors=True)
    return None
