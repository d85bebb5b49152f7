"""The fine-tuning engine: every job that fine-tunes a BiT model runs through `run_finetuning`.

A `FinetuneJob` says what to fine-tune (a checkpoint, or an architecture from random weights), on what (an
`ImageClassificationData`: training and evaluation splits), with which BiT-HyperRule variant and overrides and
which further Trainer settings (mixed precision, compilation, logging, trackers, ...), how many times (trials,
each with its own seed and, for few-shot, its own balanced subset), and where the result goes.
`run_finetuning(job)`:

1. checks the output folder (nothing is written before every input has been checked);
2. plans the run: the rule from the data (training-set size, median image area), the first trial's model,
   the micro-batch for this device and number of processes (`BitHyperRule.for_device`, the one place it is
   chosen), the evaluation images;
3. trains and evaluates every trial not finished yet, each in `work_dir/trial-N` (resumable from its newest
   complete checkpoint: `finetune.checkpoints`);
4. assembles the output folder from the median trial's model (`finetune.output_folder`);

and returns a `FinetuneResult`. Under `torchrun` / `accelerate launch` every process runs the same trials data
parallel (the rule's batch is split across the processes); only the main process writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from modeling_bit.file_utils import atomic_write_json

from .checkpoints import newest_complete_checkpoint
from .data import ImageClassificationData, check_classes, few_shot_indices, label_array, median_image_area
from .distributed import process_state
from .errors import FinetuneInputError
from .hyperrule import PAPER, BitHyperRule, mixup_micro_batch_warning
from .metrics import ClassificationMetrics
from .models import load_model_for_labels
from .output_folder import RUN_FILE_NAME, check_output_dir, work_dir_of, write_output_folder
from .preprocessing import (
    DecodedImages,
    HyperRuleTrainingStream,
    ImageBatchCollator,
    PreprocessedImages,
    StreamedImages,
    fits_in_memory,
    preprocess,
)
from .progress import TrialProgress, transformers_quiet
from .trainer import BitTrainer, BitTrainingArguments

logger = logging.getLogger(__name__)

# Called after each trial with (job, trial number from 1, accuracy).
TrialHook = Callable[["FinetuneJob", int, float], None]

# DataLoader worker processes decoding images, unless the job says otherwise.
DEFAULT_NUM_WORKERS = min(4, os.cpu_count() or 1)
TRIAL_RESULT_FILE_NAME = "result.json"
# Trainer settings that may differ between an interrupted run and its resume: they change neither the data
# order nor the numerics, only how the run is watched, fed or published.
RESUMABLE_TRAINING_SETTINGS = frozenset(
    {
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "disable_tqdm",
        "hub_model_id",
        "hub_private_repo",
        "hub_token",
        "log_level",
        "log_level_replica",
        "logging_first_step",
        "logging_steps",
        "logging_strategy",
        "project",
        "push_to_hub",
        "report_to",
        "run_name",
        "save_total_limit",
        "trackio_space_id",
    }
)


@dataclasses.dataclass
class FinetuneJob:
    """One fine-tuning job: `trials` runs of the same setting, reported by their median.

    Attributes:
        model: checkpoint to fine-tune (a `from_pretrained` folder, a Hub id, a published BiT name), or with
            `from_scratch` an architecture (a preset name or a folder with a BiT config) from random weights.
        data: training and evaluation splits. `data.train` may also be `PreprocessedImages` already resized to
            the rule's pre-crop (and `data.eval` to its crop), as the main job prepares its digits once.
        hyperrule: "paper" or "released" (`finetune.hyperrule`); `large_resolution` replaces the variant's
            resolution for large images; `rule_overrides` are `BitHyperRule` fields given by the user;
            `task_augmentation` turns off the random crop or flip the task's labels forbid (paper Appendix B), as
            part of the rule rather than an override.
        gradient_accumulation_steps: given instead of a micro-batch: the micro-batch follows from it.
        median_image_area: measured by the caller (not an override); None: measured from the training images.
        examples_per_class: few-shot: each trial draws its own balanced subset of this many examples per class.
        seed: trial n uses seed + n - 1 (subset, data order, augmentation, MixUp, random initial weights).
        output_dir: the fine-tuned folder (median trial's model, results, card); None: results only.
        work_dir: where the trials run; default `output_dir/checkpoints`, or a temporary folder.
        training: further `TrainingArguments` fields (bf16, torch_compile, logging_steps, report_to, ...);
            `dataloader_num_workers` also sets the processes decoding images (default: up to 4).
        quiet: no progress bars and no per-trial messages (for callers that report themselves).
        command: the command line to record in `bit_finetune_args.json`.
        extra_results: called on the main process with (job, result) once the trials are done, before the output
            folder is written; the dict it returns is added to the results (`all_results.json`), e.g. the
            accuracy on the test set without near-duplicates (`finetune.duplicates`).
    """

    model: str
    data: ImageClassificationData
    from_scratch: bool = False
    hyperrule: str = PAPER
    large_resolution: tuple[int, int] | None = None
    rule_overrides: dict = dataclasses.field(default_factory=dict)
    task_augmentation: dict = dataclasses.field(default_factory=dict)
    gradient_accumulation_steps: int | None = None
    median_image_area: float | None = None
    examples_per_class: int | None = None
    trials: int = 1
    seed: int = 0
    output_dir: str | os.PathLike | None = None
    work_dir: str | os.PathLike | None = None
    training: dict = dataclasses.field(default_factory=dict)
    save_checkpoints: bool = True
    resume: bool = False
    overwrite_output_dir: bool = False
    per_class_accuracy: bool = False
    quiet: bool = False
    command: list[str] = dataclasses.field(default_factory=list)
    extra_results: Callable[[FinetuneJob, FinetuneResult], dict] | None = None

    def __post_init__(self):
        if self.trials < 1:
            raise FinetuneInputError(f"--trials {self.trials}: expected at least 1.")
        if self.seed < 0:
            raise FinetuneInputError(f"--seed {self.seed}: expected a non-negative integer.")
        if self.resume and self.overwrite_output_dir:
            raise FinetuneInputError(
                "--resume continues the run in --output-dir and --overwrite-output-dir discards it: give one."
            )

    @property
    def num_workers(self) -> int:
        return int(self.training.get("dataloader_num_workers", DEFAULT_NUM_WORKERS))

    def signature(self) -> dict:
        """What defines the run's results, as JSON: a `--resume` must match it (RUN_FILE_NAME)."""

        def plain(value):
            return list(value) if isinstance(value, tuple) else value

        signature = {
            "model": str(self.model),
            "from_scratch": self.from_scratch,
            "data": self.data.source,
            "hyperrule": self.hyperrule,
            "large_resolution": plain(self.large_resolution),
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "task_augmentation": dict(sorted(self.task_augmentation.items())),
            "examples_per_class": self.examples_per_class,
            "trials": self.trials,
            "seed": self.seed,
            "processes": process_state().num_processes,
            "per_class_accuracy": self.per_class_accuracy,
        }
        # One entry per rule field and Trainer setting, so that a refused resume names each change.
        signature.update({name: plain(value) for name, value in sorted(self.rule_overrides.items())})
        signature.update(
            {
                name: value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
                for name, value in sorted(self.training.items())
                if name not in RESUMABLE_TRAINING_SETTINGS
            }
        )
        return signature


@dataclasses.dataclass
class TrialResult:
    """What one trial leaves behind: its metrics, log history and the unreadable images it met."""

    train_metrics: dict
    eval_metrics: dict
    log_history: list
    unreadable_images: list[str]
    num_train_examples: int | None
    num_eval_examples: int

    @property
    def accuracy(self) -> float:
        return self.eval_metrics["eval_accuracy"]


@dataclasses.dataclass
class FinetuneResult:
    """A finished job: the rule it ran, every trial's result, the trial whose model is kept (from 1), the
    HF-examples-style results, and the folders (output folder: None without `output_dir`)."""

    rule: BitHyperRule
    trials: list[TrialResult]
    saved_trial: int
    eval_results: dict
    all_results: dict
    unreadable_images: list[str]
    folder: Path | None
    work_dir: Path

    @property
    def accuracies(self) -> list[float]:
        return [trial.accuracy for trial in self.trials]

    @property
    def accuracy(self) -> float:
        """The median over the trials (the paper's few-shot report)."""
        return self.eval_results["eval_accuracy"]

    def saved_model_dir(self) -> Path:
        return self.work_dir / f"trial-{self.saved_trial}" / "model"


# --- Trials: statistics ----------------------------------------------------------------------------


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


# --- Inputs ---------------------------------------------------------------------------------------


def training_set_size(job: FinetuneJob) -> int:
    """Examples one trial trains on: K x classes for few-shot, the training split otherwise."""
    data = job.data
    if job.examples_per_class is not None:
        return job.examples_per_class * data.num_classes
    if "dataset_size" in job.rule_overrides:
        return int(job.rule_overrides["dataset_size"])
    if not isinstance(data.train, datasets.IterableDataset):
        return len(data.train)
    split = (data.train.info.splits or {}).get(str(data.train.split))
    if split is None or not split.num_examples:
        raise FinetuneInputError(
            "The stream does not declare its number of examples, which BiT-HyperRule's schedule depends on; "
            "pass --dataset-size N."
        )
    return split.num_examples


def train_labels(train) -> np.ndarray:
    if isinstance(train, PreprocessedImages):
        return train.labels.numpy()
    return label_array(train)


def trial_training_pool(job: FinetuneJob, seed: int):
    """The examples trial `seed` trains on: a seeded balanced subset for few-shot, else the training split."""
    train = job.data.train
    if job.examples_per_class is None:
        return train
    indices = few_shot_indices(train_labels(train), job.examples_per_class, seed, job.data.label_names)
    return train.select(indices)


def training_inputs(
    train, rule: BitHyperRule, *, seed: int, num_workers: int
) -> tuple[torch.utils.data.Dataset, list[str]]:
    """(the training dataset for the Trainer, unreadable images found while preparing it).

    The rule says whether to crop and flip at random (`rule.random_crop`, `rule.horizontal_flip`). Without random
    crops, training images are resized straight to the crop size (docs/recipe.md, label-semantics exceptions).
    Small sets are decoded once into memory; larger ones in the DataLoader workers.
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


def evaluation_inputs(evaluation, resolution: int, *, num_workers: int) -> tuple[torch.utils.data.Dataset, list[str]]:
    """(the evaluation dataset at the crop resolution, unreadable images found while preparing it)."""
    if isinstance(evaluation, PreprocessedImages):
        return evaluation, list(evaluation.unreadable)
    if isinstance(evaluation, datasets.IterableDataset):
        return StreamedImages(evaluation, resolution), []
    if fits_in_memory(len(evaluation), resolution):
        images = preprocess(evaluation, resolution, num_workers=num_workers, description="Decoding evaluation images")
        if len(images) == 0:
            raise FinetuneInputError("None of the evaluation images is readable.")
        return images, images.unreadable
    return DecodedImages(evaluation, resolution), []


# --- Planning -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    rule: BitHyperRule
    first_model: torch.nn.Module | None
    eval_dataset: torch.utils.data.Dataset
    eval_unreadable: list[str]


def _log(job: FinetuneJob, message: str, *args) -> None:
    if not job.quiet:
        logger.info(message, *args)


def plan_rule(job: FinetuneJob, model: torch.nn.Module) -> BitHyperRule:
    """The job's rule for this device and number of processes, from its training data and overrides."""
    overrides = dict(job.rule_overrides)
    area = overrides.pop("median_image_area", None)
    if area is not None:
        overrides["median_image_area"] = area
    elif job.median_image_area is not None:
        area = job.median_image_area
    else:
        area, measured = median_image_area(job.data.train, seed=job.seed)
        _log(job, "Median image area %s px, read from the headers of %d training images.", f"{area:,.0f}", measured)
    rule = BitHyperRule.from_dataset(
        training_set_size(job),
        area,
        variant=job.hyperrule,
        large_resolution=job.large_resolution,
        task_augmentation=job.task_augmentation,
        **overrides,
    )
    state = process_state()
    if job.gradient_accumulation_steps is not None and rule.micro_batch_size is None:
        per_step = state.num_processes * job.gradient_accumulation_steps
        if rule.batch_size % per_step:
            raise FinetuneInputError(
                f"--gradient-accumulation-steps {job.gradient_accumulation_steps} x {state.num_processes} process(es) "
                f"does not divide the batch of {rule.batch_size}."
            )
        rule = dataclasses.replace(rule, micro_batch_size=rule.batch_size // per_step)
    rule = rule.for_device(model, state.device, state.num_processes)
    if job.gradient_accumulation_steps not in (None, rule.gradient_accumulation_steps()):
        raise FinetuneInputError(
            f"--gradient-accumulation-steps {job.gradient_accumulation_steps} with a micro-batch of "
            f"{rule.micro_batch_size} on {state.num_processes} process(es) makes a batch of "
            f"{rule.micro_batch_size * state.num_processes * job.gradient_accumulation_steps}, not the rule's "
            f"{rule.batch_size}: give --batch-size too, or drop one of them."
        )
    return rule


def plan(job: FinetuneJob, model: torch.nn.Module | None = None) -> _Plan:
    """Everything the trials need, checked before anything is written: data, rule, first model (`model`, when
    the caller has loaded it), evaluation."""
    data = job.data
    if not isinstance(data.train, PreprocessedImages):  # prepared by the caller, who knows its classes
        check_classes(data)
    if job.examples_per_class is not None and data.streaming:
        raise FinetuneInputError("--examples-per-class draws from the whole training set; drop --streaming.")
    if job.examples_per_class is not None:
        # A K larger than the smallest class fails here, before anything is written.
        few_shot_indices(train_labels(data.train), job.examples_per_class, job.seed, data.label_names)
    for announcement in data.announcements:
        _log(job, announcement)
    if model is None:
        model = load_model_for_labels(
            job.model, data.label_names, from_scratch=job.from_scratch, seed=job.seed, announce=not job.quiet
        )
    rule = plan_rule(job, model)
    _log(job, rule.describe())
    warning = mixup_micro_batch_warning(rule.mixup_alpha, rule.micro_batch_size)
    if warning:
        logger.warning(warning)
    eval_dataset, eval_unreadable = evaluation_inputs(data.eval, rule.crop, num_workers=job.num_workers)
    return _Plan(rule, model, eval_dataset, eval_unreadable)


# --- One trial ------------------------------------------------------------------------------------


def trial_training_arguments(job: FinetuneJob, rule: BitHyperRule, trial_dir: Path, *, seed: int, in_memory: bool):
    """The Trainer arguments of one trial: the rule's, then the engine's defaults, then the job's settings."""
    defaults = {
        "seed": seed,
        # Images already in memory only need a crop and a flip (unless workers are asked for); others are decoded
        # in the workers.
        "dataloader_num_workers": 0 if in_memory else job.num_workers,
        "dataloader_pin_memory": torch.cuda.is_available(),
        # Batches in pinned memory are copied to the GPU without blocking the host, which goes on to queue the step.
        "accelerator_config": {"non_blocking": torch.cuda.is_available()},
        "save_strategy": "steps" if job.save_checkpoints else "no",
        "disable_tqdm": True,  # TrialProgress draws the bar
        # Every parameter of a BiT classifier takes part in each forward pass; DDP need not look for unused ones.
        "ddp_find_unused_parameters": False,
    }
    settings = {**defaults, **job.training, "seed": seed}
    if not job.save_checkpoints:
        settings["save_strategy"] = "no"
    return BitTrainingArguments.from_hyperrule(rule, str(trial_dir), **settings)


def train_trial(
    job: FinetuneJob,
    rule: BitHyperRule,
    model: torch.nn.Module,
    train_dataset: torch.utils.data.Dataset,
    eval_dataset: torch.utils.data.Dataset,
    trial_dir: Path,
    *,
    trial: int,
    seed: int,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[BitTrainer, TrialResult]:
    """Fine-tune `model` with `rule` (micro-batch chosen) and evaluate it; checkpoints in `trial_dir`."""
    state = process_state()
    in_memory = isinstance(getattr(train_dataset, "source", None), PreprocessedImages)
    args = trial_training_arguments(job, rule, trial_dir, seed=seed, in_memory=in_memory)
    trainer = BitTrainer(
        model,
        args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=ImageBatchCollator(rule.crop),
        compute_metrics=ClassificationMetrics(job.data.label_names, per_class=job.per_class_accuracy),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if not job.quiet:
        trainer.add_callback(
            TrialProgress(trial, job.trials, state.device, print_logs="logging_steps" in job.training)
        )
    checkpoint = None
    if job.resume:
        if state.is_main_process:
            checkpoint = newest_complete_checkpoint(
                trial_dir, processes=state.num_processes, with_optimizer=not args.save_only_model
            )
        state.wait_for_everyone()
        if not state.is_main_process:
            checkpoint = newest_complete_checkpoint(
                trial_dir, processes=state.num_processes, with_optimizer=not args.save_only_model, remove_torn=False
            )
        if checkpoint is not None:
            _log(job, "Resuming from %s.", checkpoint)
    with transformers_quiet():
        train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        eval_metrics = trainer.evaluate()
    eval_metrics["eval_samples"] = trainer.evaluated_examples
    train_metrics = dict(train_output.metrics)
    source = getattr(train_dataset, "source", None)
    num_train = len(source) if source is not None else None
    train_metrics["train_samples"] = num_train
    unreadable = sorted({name for names in gather_object([sorted(trainer.unreadable_images)]) for name in names})
    result = TrialResult(
        train_metrics=train_metrics,
        eval_metrics=eval_metrics,
        log_history=list(trainer.state.log_history),
        unreadable_images=unreadable,
        num_train_examples=num_train,
        num_eval_examples=trainer.evaluated_examples,
    )
    return trainer, result


def load_trial_result(trial_dir: Path) -> TrialResult | None:
    path = trial_dir / TRIAL_RESULT_FILE_NAME
    try:
        return TrialResult(**json.loads(path.read_text())) if path.is_file() else None
    except (OSError, ValueError, TypeError):
        return None  # torn by a kill (it is written atomically, so only by a foreign edit): the trial reruns


# --- The job --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _work_dir(job: FinetuneJob) -> Iterator[Path]:
    """The job's trial folders: given, inside the output folder, or temporary (removed afterwards)."""
    if job.work_dir is not None:
        yield Path(job.work_dir)
    elif job.output_dir is not None:
        yield work_dir_of(job.output_dir)
    else:
        folder = Path(tempfile.mkdtemp(prefix="bit-finetune-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _start_run(work_dir: Path, job: FinetuneJob, resuming: bool) -> None:
    """Record the run's signature (what --resume compares against) before its first training step; an earlier
    unfinished run is discarded first unless it is resumed. The main process writes; the others wait for it, so
    none of them trains into a folder being removed."""
    state = process_state()
    if state.is_main_process and not resuming:
        if work_dir.exists():
            shutil.rmtree(work_dir)
        atomic_write_json(work_dir / RUN_FILE_NAME, job.signature())
    state.wait_for_everyone()


def run_finetuning(
    job: FinetuneJob, callbacks: Sequence[TrainerCallback] = (), on_trial_end: TrialHook | None = None
) -> FinetuneResult:
    """Run every trial of `job` (resumable), assemble its output folder if it has one; see the module docstring.
    `callbacks` go to every trial's Trainer; `on_trial_end(job, trial, accuracy)` is called after each trial."""
    state = process_state()
    resuming = False
    if job.output_dir is not None:
        resuming = check_output_dir(
            job.output_dir, resume=job.resume, overwrite=job.overwrite_output_dir, signature=job.signature()
        )
    planned = plan(job)
    if job.resume:
        _log(
            job,
            "Resuming the run in %s." if resuming else "Nothing to resume in %s; starting the run.",
            job.output_dir,
        )
    with _work_dir(job) as work_dir:
        results = _run_trials(job, planned, work_dir, resuming, callbacks, on_trial_end)
        result = summarize(job, planned.rule, results, work_dir)
        if job.extra_results is not None and state.is_main_process:
            result.all_results.update(job.extra_results(job, result))
        if job.output_dir is not None and state.is_main_process:
            result.folder = write_result_folder(job, result, job.output_dir)
        state.wait_for_everyone()
    return result


def _run_trials(
    job: FinetuneJob, planned: _Plan, work_dir: Path, resuming: bool, callbacks=(), on_trial_end=None
) -> list[TrialResult]:
    state = process_state()
    results: list[TrialResult] = []
    model = planned.first_model
    started = False
    for trial in range(1, job.trials + 1):
        trial_dir = work_dir / f"trial-{trial}"
        finished = load_trial_result(trial_dir) if resuming else None
        if finished is not None:
            _log(job, "Trial %d of %d already finished: accuracy %.4f.", trial, job.trials, finished.accuracy)
            results.append(finished)
            continue
        seed = job.seed + trial - 1
        if model is None:
            model = load_model_for_labels(
                job.model, job.data.label_names, from_scratch=job.from_scratch, seed=seed, announce=False
            )
        train_dataset, train_unreadable = training_inputs(
            trial_training_pool(job, seed), planned.rule, seed=seed, num_workers=job.num_workers
        )
        if not started:
            _start_run(work_dir, job, resuming)
            started = True
        if job.trials > 1:
            _log(job, "Trial %d of %d (seed %d).", trial, job.trials, seed)
        trainer, result = train_trial(
            job,
            planned.rule,
            model,
            train_dataset,
            planned.eval_dataset,
            trial_dir,
            trial=trial,
            seed=seed,
            callbacks=callbacks,
        )
        model = None  # every trial starts from freshly loaded weights
        result.unreadable_images = sorted(
            set(result.unreadable_images) | set(train_unreadable) | set(planned.eval_unreadable)
        )
        with transformers_quiet():
            trainer.save_model(str(trial_dir / "model"))
        if state.is_main_process:
            atomic_write_json(trial_dir / TRIAL_RESULT_FILE_NAME, dataclasses.asdict(result))
        _log(job, "Trial %d of %d: accuracy %.4f.", trial, job.trials, result.accuracy)
        results.append(result)
        if on_trial_end is not None:
            on_trial_end(job, trial, result.accuracy)
    return results


def summarize(job: FinetuneJob, rule: BitHyperRule, results: list[TrialResult], work_dir: Path) -> FinetuneResult:
    """The job's HF-examples-style results: with trials, `eval_accuracy` is their median and the other eval
    metrics are the saved trial's; `eval_accuracy_saved_trial` is its accuracy and `saved_trial` its number."""
    saved = median_trial([result.accuracy for result in results])
    chosen = results[saved - 1]
    eval_results = dict(chosen.eval_metrics)
    all_results = dict(chosen.train_metrics)
    if len(results) > 1:
        eval_results.update(trial_summary([result.accuracy for result in results]))
        eval_results["eval_accuracy_saved_trial"] = chosen.accuracy
        all_results["saved_trial"] = saved
    unreadable = sorted({name for result in results for name in result.unreadable_images})
    all_results.update(eval_results, unreadable_images=len(unreadable))
    return FinetuneResult(
        rule=rule,
        trials=results,
        saved_trial=saved,
        eval_results=eval_results,
        all_results=all_results,
        unreadable_images=unreadable,
        folder=None,
        work_dir=work_dir,
    )


def write_result_folder(
    job: FinetuneJob, result: FinetuneResult, output_dir: str | os.PathLike, *, extra_results: dict | None = None
) -> Path:
    """Write the job's output folder from its saved trial's model (main process); `extra_results` are added to
    `all_results.json` (the main job adds its table)."""
    chosen = result.trials[result.saved_trial - 1]
    dataset_record = {
        **job.data.source,
        "num_train_examples": chosen.num_train_examples,
        "num_eval_examples": chosen.num_eval_examples,
        "num_classes": job.data.num_classes,
        "examples_per_class": job.examples_per_class,
        "trials": len(result.trials),
    }
    finetune_args = {
        "command": list(job.command),
        "model": str(job.model),
        # A local folder wins over a Hub repo of the same name (from_pretrained), and a relative path reads like a
        # Hub id: say which it was, so a model card links a Hub base model only when there is one.
        "model_is_local_folder": Path(job.model).is_dir(),
        "dataset": dataset_record,
        "from_scratch": job.from_scratch,
        "unreadable_images": result.unreadable_images,
    }
    return write_output_folder(
        output_dir,
        result.saved_model_dir(),
        result.rule,
        eval_results=result.eval_results,
        all_results={**result.all_results, **(extra_results or {})},
        finetune_args=finetune_args,
        log_history=chosen.log_history,
    )


# --- Several jobs, their trials in parallel worker processes -----------------------------------------

# The jobs and plans a forked worker runs trials of (inherited through fork, never pickled).
_POOL_JOBS: tuple[list[FinetuneJob], list[_Plan], list[Path]] | None = None


def default_trial_processes() -> int:
    """One worker process per CPU core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_finetuning_jobs(
    jobs: Sequence[FinetuneJob], *, processes: int | None = None, on_trial_end: TrialHook | None = None
) -> list[FinetuneResult]:
    """The results of several jobs without output folders (the main job's grid), their trials run `processes`
    at a time (default: one per CPU core) in forked worker processes of one intra-op thread each.

    The results equal `run_finetuning` of each job in turn: every trial is a function of its job and its seed
    (subset, data order, augmentation, MixUp and random weights are seeded; one thread each keeps the
    arithmetic the same). Every job is planned first, so bad input fails before any training. Where fork is not
    available, under a distributed launcher, or with one process, the trials run here one after the other.
    """
    global _POOL_JOBS
    if any(job.output_dir is not None or job.resume for job in jobs):
        raise ValueError("run_finetuning_jobs runs jobs without output folders; use run_finetuning for those.")
    processes = processes or default_trial_processes()
    tasks = [(index, trial) for index, job in enumerate(jobs) for trial in range(1, job.trials + 1)]
    parallel = (
        processes > 1
        and len(tasks) > 1
        and process_state().num_processes == 1
        and "fork" in multiprocessing.get_all_start_methods()
    )
    # Jobs that start from the same weights (the main job's arms) load them once for planning.
    first_models: dict[tuple, torch.nn.Module] = {}
    plans = []
    for job in jobs:
        key = (str(job.model), job.from_scratch, job.seed, tuple(job.data.label_names))
        shared = first_models.get(key)
        planned = plan(job, shared)
        if shared is None:
            first_models[key] = planned.first_model
        else:
            planned.first_model = None  # the job that loaded it trains it; this one loads its own
        plans.append(planned)
    first_models.clear()
    with contextlib.ExitStack() as stack:
        work_dirs = [stack.enter_context(_work_dir(job)) for job in jobs]
        if not parallel:
            trials = [
                _run_trials(job, planned, work_dir, False, on_trial_end=on_trial_end)
                for job, planned, work_dir in zip(jobs, plans, work_dirs)
            ]
        else:
            for job, work_dir in zip(jobs, work_dirs):
                _start_run(work_dir, job, resuming=False)
            for planned in plans:
                planned.first_model = None  # each worker loads its own (the same weights: seeded)
            trials = [[None] * job.trials for job in jobs]
            _POOL_JOBS = (list(jobs), plans, work_dirs)
            try:
                context = multiprocessing.get_context("fork")
                with context.Pool(
                    min(processes, len(tasks)), initializer=torch.set_num_threads, initargs=(1,)
                ) as pool:
                    for index, trial, result in pool.imap_unordered(_pool_trial, tasks):
                        trials[index][trial - 1] = result
                        if on_trial_end is not None:
                            on_trial_end(jobs[index], trial, result.accuracy)
            finally:
                _POOL_JOBS = None
        return [
            summarize(job, planned.rule, job_trials, work_dir)
            for job, planned, job_trials, work_dir in zip(jobs, plans, trials, work_dirs)
        ]


def _pool_trial(task: tuple[int, int]) -> tuple[int, int, TrialResult]:
    """Trial `trial` of job `index` of `_POOL_JOBS`, in a worker process."""
    index, trial = task
    jobs, plans, work_dirs = _POOL_JOBS
    job, planned = jobs[index], plans[index]
    trial_dir = work_dirs[index] / f"trial-{trial}"
    seed = job.seed + trial - 1
    model = load_model_for_labels(
        job.model, job.data.label_names, from_scratch=job.from_scratch, seed=seed, announce=False
    )
    train_dataset, train_unreadable = training_inputs(
        trial_training_pool(job, seed), planned.rule, seed=seed, num_workers=job.num_workers
    )
    trainer, result = train_trial(
        job, planned.rule, model, train_dataset, planned.eval_dataset, trial_dir, trial=trial, seed=seed
    )
    result.unreadable_images = sorted(
        set(result.unreadable_images) | set(train_unreadable) | set(planned.eval_unreadable)
    )
    with transformers_quiet():
        trainer.save_model(str(trial_dir / "model"))
    return index, trial, result
