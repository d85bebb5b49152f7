"""The output folder: refused up front when it is not pre-training's to write, and `O/final` at the end.

`O` holds only what pre-training writes: `checkpoints/`, `training_log.jsonl`, `probe_results.json`,
`final/` (and their staging names while they are written, and the tracker's folder). A folder holding
anything else, a filesystem root, a file or an unwritable place is refused before anything is written, as
`bit-convert` and `bit-finetune` refuse theirs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from image_data import InputError
from model_cards import write_model_card
from modeling_bit import bit_image_processor
from modeling_bit.file_utils import atomic_directory, atomic_write_json
from modeling_bit.folder_layout import PRETRAINING_FILE, PRETRAINING_LOG_FILE, PROBE_RESULTS_FILE

from .checkpoints import CHECKPOINTS_FOLDER, checkpoints_of_another_run
from .launching import launch_prefix
from .reporting import differences_from_paper

FINAL_FOLDER = "final"
TRACKER_PROJECT = "bit-pretraining"  # accelerate's trackers write O/<project> (tensorboard)
OUTPUT_NAMES = (CHECKPOINTS_FOLDER, PRETRAINING_LOG_FILE, PROBE_RESULTS_FILE, FINAL_FOLDER, TRACKER_PROJECT)


def _is_ours(name: str) -> bool:
    """One of pre-training's outputs, or its staging name while being written (`.final.XXXX.partial`, ...)."""
    return name in OUTPUT_NAMES or any(name.startswith(f".{output}.") for output in OUTPUT_NAMES)


def check_output_dir(output_dir: Path) -> None:
    """Refuse an --output-dir pre-training must not write into; reads only."""
    absolute = output_dir.absolute()
    if absolute.resolve().parent == absolute.resolve():
        raise InputError(
            f"--output-dir {output_dir} is a filesystem root: pre-training writes checkpoints/, final/ and its logs "
            "into --output-dir. Give it a folder of its own (e.g. runs/NAME)."
        )
    nearest = next(path for path in (absolute, *absolute.parents) if path.exists())
    if not nearest.is_dir():
        raise InputError(f"--output-dir {output_dir}: {nearest} is a file; expected a folder (new or empty).")
    try:  # a probe, not os.access: root passes os.access where the file system refuses writes anyway
        tempfile.TemporaryFile(dir=nearest).close()
    except OSError as error:
        raise InputError(
            f"--output-dir {output_dir}: cannot write in {nearest} ({error.strerror or error}); expected a writable "
            "folder."
        ) from error
    if absolute.is_dir():
        foreign = sorted(name for name in os.listdir(absolute) if not _is_ours(name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign) - 5} more)" if len(foreign) > 5 else "")
            raise InputError(
                f"--output-dir {output_dir} holds files pre-training did not write ({shown}); expected a new or empty "
                f"folder, or one an earlier run wrote ({', '.join(OUTPUT_NAMES[:4])}). Choose another --output-dir."
            )


def prepare_output_dir(output_dir: Path, resume_from_checkpoint: str | None, overwrite: bool) -> list[Path]:
    """Check --output-dir (`check_output_dir`, and another run's checkpoints), then create it; returns the other
    run's checkpoints that --overwrite-output-dir deletes (once the processes are up: `delete_checkpoints`)."""
    check_output_dir(output_dir)
    foreign = checkpoints_of_another_run(output_dir, resume_from_checkpoint, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    return foreign


def delete_checkpoints(accelerator, output_dir: Path, checkpoints: list[Path]) -> None:
    if checkpoints and accelerator.is_main_process:
        shutil.rmtree(output_dir / CHECKPOINTS_FOLDER)
        accelerator.print(f"--overwrite-output-dir: deleted {len(checkpoints)} checkpoint(s) of an earlier run.")
    accelerator.wait_for_everyone()


def pretraining_record(
    command: list[str], run, source, final_loss: float, accelerator, unreadable: dict, exactness: dict, max_steps
) -> dict:
    """bit_pretraining.json: how the model was produced (read by the model card)."""
    recipe, schedule = run.recipe, run.schedule
    distributed_type = accelerator.distributed_type.value
    return {
        "command": command,
        "recipe": {**recipe.to_dict(), "total_steps": schedule.total_steps, "decay_steps": list(schedule.decay_steps)},
        "differences_from_paper": differences_from_paper(run, max_steps),
        "dataset": source.description,
        "steps": schedule.total_steps,
        "global_batch_size": recipe.global_batch_size,
        "final_loss": final_loss,
        "num_processes": accelerator.num_processes,
        "unreadable_images": unreadable["count"],
        "unreadable_image_names": unreadable["names"],
        "warmup": run.warmup_record(),
        # The launcher line that runs this many processes again (accelerate needs --multi_gpu for that, on CPUs too).
        "launch": {
            "distributed_type": distributed_type,
            "launcher": launch_prefix(accelerator.num_processes, None, distributed_type),
        },
        "exactness": exactness,
    }


def bit_transfer_version() -> str:
    try:
        return version("bit-transfer")
    except PackageNotFoundError:
        return "0+unknown"


def save_final(accelerator, model, output_dir: Path, image_size: int, record: dict, probe_results: list) -> Path:
    """`O/final`: save_pretrained folder + image processor + `record` (bit_pretraining.json) + the training log and
    probe results + the model card, written into a staging folder that replaces `O/final` only when complete."""
    state_dict = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers shards)
    final = output_dir / FINAL_FOLDER
    if accelerator.is_main_process:
        with atomic_directory(final) as staging:
            unwrapped = accelerator.unwrap_model(model)
            contiguous = {name: tensor.contiguous() for name, tensor in state_dict.items()}
            unwrapped.save_pretrained(staging, state_dict=contiguous)
            bit_image_processor(image_size).save_pretrained(staging)
            atomic_write_json(staging / PRETRAINING_FILE, {**record, "bit_transfer_version": bit_transfer_version()})
            log = output_dir / PRETRAINING_LOG_FILE
            (staging / PRETRAINING_LOG_FILE).write_text(log.read_text() if log.exists() else "")
            atomic_write_json(staging / PROBE_RESULTS_FILE, probe_results)
            write_model_card(staging, folder_name=final.name)  # the folder appears with its card
        accelerator.print(f"Saved the pre-trained model to {final}")
    accelerator.wait_for_everyone()
    return final
