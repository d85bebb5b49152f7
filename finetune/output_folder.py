"""The folder a fine-tuning job produces: what may be written where, assembling it, uploading it.

`check_output_dir` refuses, before anything is trained or written, an output folder that cannot be used: a
filesystem root, a home directory or the working directory (replacing it would delete everything in it), a
path under a file, a non-empty folder without `--overwrite-output-dir`, or an unfinished run without
`--resume`. `write_output_folder` assembles the fine-tuned folder (modeling_bit/folder_layout.py "fine-tuned"):
config.json with id2label, model.safetensors, preprocessor_config.json at the evaluation resolution,
bit_hyperrule.json, all_results.json / eval_results.json, bit_finetune_args.json, training_log.json, then
README.md by `model_cards.write_model_card`, all in a staging folder that replaces the output folder only when
complete. `push_to_hub` uploads a finished folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from model_cards import write_model_card
from modeling_bit import bit_image_processor
from modeling_bit.file_utils import atomic_directory, atomic_write_json
from modeling_bit.folder_layout import (
    ALL_RESULTS_FILE,
    EVAL_RESULTS_FILE,
    FINETUNE_ARGS_FILE,
    FINETUNE_LOG_FILE,
    HYPERRULE_FILE,
    MODEL_FILES,
)

from .errors import FinetuneInputError
from .hyperrule import BitHyperRule

# Inside the output folder while a run is unfinished: one Trainer output folder per trial (checkpoints, the
# trial's final model and result), removed once the output folder is complete.
WORK_DIR_NAME = "checkpoints"
# The run's arguments (what --resume compares against), written before its first training step.
RUN_FILE_NAME = "run.json"


def work_dir_of(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / WORK_DIR_NAME


def _replacing_deletes_too_much(output_dir: Path) -> str | None:
    """Why replacing `output_dir` as a whole would delete far more than a result, or None: it is a filesystem
    root, or holds the current directory or the home directory."""
    resolved = output_dir.resolve()
    if resolved == Path(resolved.anchor):
        return "a filesystem root"
    protected = {Path.home().resolve(): "your home directory", Path.cwd().resolve(): "the current directory"}
    if resolved in protected:
        return protected[resolved]
    holding = [name for folder, name in protected.items() if resolved in folder.parents]
    return f"a folder that holds {holding[0]}" if holding else None


def check_output_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool, signature: dict) -> bool:
    """Whether `output_dir` holds an unfinished run that `resume` continues; raise `FinetuneInputError` if the
    folder cannot be used as asked. Reads only: nothing is written or removed until the whole input is checked.

    On `resume`, the unfinished run's recorded `signature` must equal this one (`RUN_FILE_NAME`)."""
    output_dir = Path(output_dir)
    kind = _replacing_deletes_too_much(output_dir)
    if kind is not None:
        raise FinetuneInputError(
            f"--output-dir {output_dir} is {kind}: the finished folder replaces the output folder as a whole, which "
            "would delete everything in it. Give a new or empty folder for the fine-tuned model."
        )
    run_file = work_dir_of(output_dir) / RUN_FILE_NAME
    replace = "pass --overwrite-output-dir to replace it, or choose another --output-dir"
    if run_file.is_file() and not overwrite:
        if not resume:
            raise FinetuneInputError(
                f"{output_dir} holds an unfinished run ({run_file.parent}); pass --resume to continue it, or "
                "--overwrite-output-dir to start over."
            )
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError) as error:
            raise FinetuneInputError(
                f"{run_file} is not readable ({error}); the unfinished run cannot be resumed: pass "
                "--overwrite-output-dir to start over."
            ) from error
        changed = sorted(key for key in set(previous) | set(signature) if previous.get(key) != signature.get(key))
        if changed:
            raise FinetuneInputError(
                f"--resume continues the run in {output_dir} with its own arguments, but these differ: "
                + ", ".join(f"{key} (was {previous.get(key)!r}, now {signature.get(key)!r})" for key in changed)
            )
        return True
    nearest_existing = next(path for path in (output_dir, *output_dir.absolute().parents) if path.exists())
    if not nearest_existing.is_dir():
        raise FinetuneInputError(
            f"--output-dir {output_dir}: {nearest_existing} is a file; expected a folder (new or empty)."
        )
    if overwrite or not output_dir.is_dir() or not any(output_dir.iterdir()):
        return False
    if is_finished_folder(output_dir):
        raise FinetuneInputError(f"{output_dir} already holds a fine-tuned model (a finished run); {replace}.")
    raise FinetuneInputError(f"{output_dir} exists and is not empty; {replace}.")


def write_output_folder(
    output_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    rule: BitHyperRule,
    *,
    eval_results: dict,
    all_results: dict,
    finetune_args: dict,
    log_history: list,
) -> Path:
    """Assemble the fine-tuned folder from a saved model folder, atomically: it is built beside
    `output_dir` and replaces it (with whatever it held: an earlier result, the run's checkpoints) only
    when complete, so a crash never leaves a half-written folder. `model_dir` may be inside `output_dir`.

    The model card comes last, inside the staging folder, so the folder appears with its card."""
    output_dir, model_dir = Path(output_dir), Path(model_dir)
    with atomic_directory(output_dir) as staging:
        for name in MODEL_FILES:
            shutil.copy2(model_dir / name, staging / name)
        bit_image_processor(rule.crop).save_pretrained(staging)
        rule.save(staging)
        atomic_write_json(staging / EVAL_RESULTS_FILE, eval_results)
        atomic_write_json(staging / ALL_RESULTS_FILE, all_results)
        atomic_write_json(staging / FINETUNE_ARGS_FILE, finetune_args)
        atomic_write_json(staging / FINETUNE_LOG_FILE, {"log_history": log_history})
        write_model_card(staging, folder_name=output_dir.absolute().name)
    return output_dir


def is_finished_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a completed fine-tuning result (what `write_output_folder` writes)."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in (*MODEL_FILES, HYPERRULE_FILE))


class HubUploadError(RuntimeError):
    """The folder is saved locally, but uploading it to the Hub failed."""


def push_to_hub(
    folder: str | os.PathLike, repo_id: str | None = None, *, private: bool | None = None, token: str | None = None
) -> str:
    """Upload a finished folder as a Hub model repository (token: `token`, else HF_TOKEN or `hf auth login`); its id.

    The folder becomes Hub-ready first (widget example images, card pointing at the repository), then goes
    through the project's one push path, `model_cards.hub.push_folder` (idempotent, resumable). A bare name
    goes to the token owner's namespace, as `transformers`' `push_to_hub` does. `private` creates a new
    repository private (`--hub-private-repo`); an existing repository keeps its visibility.
    """
    from huggingface_hub import HfApi

    from model_cards import CardOptions, prepare_hub_folder
    from model_cards.hub import check_can_push, push_folder

    folder = Path(folder)
    repo_id = repo_id or folder.resolve().name
    api = HfApi(token=token)
    try:
        check_can_push(api)
        if "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        if private:
            api.create_repo(repo_id, private=True, exist_ok=True)
        prepare_hub_folder(folder, CardOptions(repo_id=repo_id))
        push_folder(folder, repo_id, api=api)
    except Exception as error:  # offline, no token, network, refusal: all mean "saved, not uploaded"
        raise HubUploadError(
            f"The fine-tuned model is saved in {folder}, but uploading it to the Hub as {repo_id!r} failed: "
            f"{type(error).__name__}: {error}. Upload it later with `bit-model-card {folder} --repo-id {repo_id} "
            f"--push` or `hf upload {repo_id} {folder}` (log in first with `hf auth login` or set HF_TOKEN)."
        ) from error
    return repo_id
