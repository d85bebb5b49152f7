"""One fine-tuning run and the folder it produces; shared by `bit-finetune` and its main job.

`train_and_evaluate` trains a model with `BitTrainer` under a `BitHyperRule` and evaluates it.
`write_output_folder` assembles the fine-tuned folder (contracts.md "Fine-tuned"): config.json with
id2label, model.safetensors, preprocessor_config.json at the evaluation resolution, bit_hyperrule.json,
all_results.json / eval_results.json, bit_finetune_args.json, training_log.json, then README.md by
`model_cards.write_model_card`. `push_to_hub` uploads a finished folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from model_cards import write_model_card
from modeling_bit import bit_image_processor
from modeling_bit.file_utils import atomic_directory, atomic_write_json

from .errors import FinetuneInputError
from .hyperrule import HYPERRULE_FILE_NAME, BitHyperRule
from .metrics import ClassificationMetrics
from .preprocessing import (
    DecodedImages,
    HyperRuleTrainingStream,
    ImageBatchCollator,
    PreprocessedImages,
    StreamedImages,
    fits_in_memory,
    preprocess,
)
from .trainer import BitTrainer, BitTrainingArguments

logger = logging.getLogger(__name__)

ARGS_FILE_NAME = "bit_finetune_args.json"
TRAINING_LOG_FILE_NAME = "training_log.json"
MODEL_FILES = ("config.json", "model.safetensors")


@dataclasses.dataclass
class RunResult:
    """What one run leaves behind: its metrics, log history and the unreadable images it met."""

    train_metrics: dict
    eval_metrics: dict
    log_history: list
    unreadable_images: list[str]
    num_train_examples: int | None
    num_eval_examples: int

    @property
    def accuracy(self) -> float:
        return self.eval_metrics["eval_accuracy"]


def training_inputs(
    train: datasets.Dataset | datasets.IterableDataset | PreprocessedImages,
    rule: BitHyperRule,
    *,
    seed: int,
    num_workers: int,
) -> tuple[torch.utils.data.Dataset, list[str]]:
    """(the training dataset for the Trainer, unreadable images found while preparing it).

    The rule says whether to crop and flip at random (`rule.random_crop`, `rule.horizontal_flip`).
    Without random crops, training images are resized straight to the crop size (BIT_RECIPE.md,
    label-semantics exceptions). Small sets are decoded once into memory; larger ones in the workers.
    """
    flip, random_crop = rule.horizontal_flip, rule.random_crop
    resolution = rule.precrop if random_crop else rule.crop
    if isinstance(train, datasets.IterableDataset):
        return StreamedImages(train, resolution, crop=rule.crop if random_crop else None, flip=flip), []
    if isinstance(train, PreprocessedImages):
        source = train
    elif fits_in_memory(len(train), resolution):
        source = preprocess(train, resolution, num_workers=num_workers, description="Decoding training images")
    else:
        source = DecodedImages(train, resolution)
    unreadable = list(getattr(source, "unreadable", []))
    stream = HyperRuleTrainingStream(
        source, rule.steps * rule.batch_size, crop=rule.crop, seed=seed, flip=flip, random_crop=random_crop
    )
    return stream, unreadable


def evaluation_inputs(
    evaluation: datasets.Dataset | datasets.IterableDataset, resolution: int, *, num_workers: int
) -> tuple[torch.utils.data.Dataset, list[str]]:
    """(the evaluation dataset at the crop resolution, unreadable images found while preparing it)."""
    if isinstance(evaluation, datasets.IterableDataset):
        return StreamedImages(evaluation, resolution), []
    if fits_in_memory(len(evaluation), resolution):
        images = preprocess(evaluation, resolution, num_workers=num_workers, description="Decoding evaluation images")
        if len(images) == 0:
            raise FinetuneInputError("None of the evaluation images is readable.")
        return images, images.unreadable
    return DecodedImages(evaluation, resolution), []


def train_and_evaluate(
    model: torch.nn.Module,
    rule: BitHyperRule,
    train_dataset: torch.utils.data.Dataset,
    eval_dataset: torch.utils.data.Dataset,
    label_names: Sequence[str],
    *,
    output_dir: str | os.PathLike,
    seed: int,
    num_workers: int = 0,
    resume: bool = False,
    per_class_accuracy: bool = False,
    save_checkpoints: bool = True,
    quiet: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    **training_arguments,
) -> tuple[BitTrainer, RunResult]:
    """Fine-tune `model` with `rule` (micro-batch chosen) and evaluate it; checkpoints in `output_dir`."""
    in_memory = isinstance(getattr(train_dataset, "source", None), PreprocessedImages)
    args = BitTrainingArguments.from_hyperrule(
        rule,
        str(output_dir),
        world_size=PartialState().num_processes,
        seed=seed,
        # In-memory images only need a crop and a flip; decoding happens in worker processes.
        dataloader_num_workers=0 if in_memory else num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        save_strategy="steps" if save_checkpoints else "no",
        disable_tqdm=quiet,
        **training_arguments,
    )
    trainer = BitTrainer(
        model,
        args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=ImageBatchCollator(rule.crop),
        compute_metrics=ClassificationMetrics(label_names, per_class=per_class_accuracy),
        callbacks=list(callbacks),
    )
    if quiet:
        trainer.remove_callback(PrinterCallback)  # with progress bars off it would print every log entry
    checkpoint = None
    if resume:
        checkpoint = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        if checkpoint:
            logger.info("Resuming from %s.", checkpoint)
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate()
    num_eval = trainer.evaluated_examples
    eval_metrics["eval_samples"] = num_eval
    train_metrics = dict(train_output.metrics)
    source = getattr(train_dataset, "source", None)
    num_train = len(source) if source is not None else None
    train_metrics["train_samples"] = num_train
    result = RunResult(
        train_metrics=train_metrics,
        eval_metrics=eval_metrics,
        log_history=list(trainer.state.log_history),
        unreadable_images=sorted(trainer.unreadable_images),
        num_train_examples=num_train,
        num_eval_examples=num_eval,
    )
    return trainer, result


def trial_summary(accuracies: Sequence[float]) -> dict:
    """The paper's few-shot report over trials: median (as eval_accuracy), min, max, and every value
    (trial 1 first). For an even number of trials the median is the mean of the two middle values."""
    return {
        "eval_accuracy": float(statistics.median(accuracies)),
        "eval_accuracy_min": float(min(accuracies)),
        "eval_accuracy_max": float(max(accuracies)),
        "eval_accuracy_trials": [float(value) for value in accuracies],
    }


def median_trial(accuracies: Sequence[float]) -> int:
    """The trial (numbered from 1) whose model a multi-trial run saves: the one with the median accuracy,
    for an even count the lower of the two middle ones (its accuracy is a real model's, which the mean
    of the two is not); ties go to the earlier trial."""
    order = sorted(range(len(accuracies)), key=lambda index: (accuracies[index], index))
    return order[(len(order) - 1) // 2] + 1


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
        atomic_write_json(staging / "eval_results.json", eval_results)
        atomic_write_json(staging / "all_results.json", all_results)
        atomic_write_json(staging / ARGS_FILE_NAME, finetune_args)
        atomic_write_json(staging / TRAINING_LOG_FILE_NAME, {"log_history": log_history})
        write_model_card(staging, folder_name=output_dir.absolute().name)
    return output_dir


def is_finished_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a completed fine-tuning result (what `write_output_folder` writes)."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in (*MODEL_FILES, HYPERRULE_FILE_NAME))


class HubUploadError(RuntimeError):
    """The folder is saved locally, but uploading it to the Hub failed."""


def push_to_hub(folder: str | os.PathLike, repo_id: str | None = None) -> str:
    """Upload a finished folder as a Hub model repository (token from HF_TOKEN or `hf auth login`); its id.

    The folder becomes Hub-ready first (widget example images, card pointing at the repository), then goes
    through the project's one push path, `model_cards.hub.push_folder` (idempotent, resumable). A bare name
    goes to the token owner's namespace, as `transformers`' `push_to_hub` does.
    """
    from huggingface_hub import HfApi

    from model_cards import CardOptions, prepare_hub_folder
    from model_cards.hub import check_can_push, push_folder

    folder = Path(folder)
    repo_id = repo_id or folder.resolve().name
    try:
        check_can_push()
        if "/" not in repo_id:
            repo_id = f"{HfApi().whoami()['name']}/{repo_id}"
        prepare_hub_folder(folder, CardOptions(repo_id=repo_id))
        push_folder(folder, repo_id)
    except Exception as error:  # offline, no token, network, refusal: all mean "saved, not uploaded"
        raise HubUploadError(
            f"The fine-tuned model is saved in {folder}, but uploading it to the Hub as {repo_id!r} failed: "
            f"{type(error).__name__}: {error}. Upload it later with `bit-model-card {folder} --repo-id {repo_id} "
            f"--push` or `hf upload {repo_id} {folder}` (log in first with `hf auth login` or set HF_TOKEN)."
        ) from error
    return repo_id
