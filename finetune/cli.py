"""`bit-finetune` (also `python -m finetune`): fine-tune a BiT model on your images with BiT-HyperRule.

  bit-finetune --model M --train-dir D [--validation-dir V] --output-dir O [--examples-per-class K]
      [--trials N] [--max-steps S] [--batch-size B] [--micro-batch-size b] [--learning-rate LR]
      [--resolution PRECROP CROP] [--mixup-alpha A] [--no-flip] [--no-crop]
      [--push-to-hub [--hub-model-id ID]] [--resume | --overwrite-output-dir]
  bit-finetune --model M --dataset NAME [--dataset-config C] [--image-column image] [--label-column label]
      [--streaming] --output-dir O ...
  bit-finetune             the main job: the embedded upstream checkpoint vs random init on
                           scikit-learn's digits, 1/5/10 examples per class and the full set

M is anything `from_pretrained` takes (a saved folder, a Hub id, a published BiT name), or with
--from-scratch a preset name (bit-tiny, BiT-M-R50x1, ...) trained from random weights. Every number not
given is BiT-HyperRule's, derived from the training data; the ones given are recorded as overrides in
O/bit_hyperrule.json. An O holding a finished result is replaced only with --overwrite-output-dir (the new
folder replaces it when complete); an unfinished run in O is continued with --resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from accelerate import PartialState
from transformers import HfArgumentParser, TrainerCallback

from modeling_bit.file_utils import atomic_write_json

from . import data as data_module
from .errors import FinetuneInputError
from .finetuning import (
    HubUploadError,
    RunResult,
    evaluation_inputs,
    is_finished_folder,
    median_trial,
    push_to_hub,
    train_and_evaluate,
    training_inputs,
    trial_summary,
    write_output_folder,
)
from .hyperrule import (
    BATCH_SIZE,
    FEW_SHOT_TRIALS,
    LARGE_IMAGE_RESOLUTION,
    LARGE_IMAGE_RESOLUTION_BIT_L,
    NO_CROP_TASKS,
    NO_FLIP_TASKS,
    BitHyperRule,
    choose_micro_batch_size,
    mixup_micro_batch_warning,
)
from .models import load_model_for_labels
from .trainer import CHECKPOINTS_PER_RUN

logger = logging.getLogger("finetune")

DEFAULT_NUM_WORKERS = min(4, os.cpu_count() or 1)
# Inside the output folder while a run is unfinished: one Trainer output folder per trial (checkpoints,
# the trial's final model and result), removed once the output folder is complete.
WORK_DIR_NAME = "checkpoints"
RUN_FILE_NAME = "run.json"
TRIAL_RESULT_FILE_NAME = "result.json"
# Arguments that may differ between an interrupted run and its --resume.
RESUME_MAY_CHANGE = frozenset({"resume", "overwrite_output_dir", "push_to_hub", "hub_model_id", "num_workers"})


@dataclasses.dataclass
class ModelArguments:
    model: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Checkpoint to fine-tune: a save_pretrained folder, a Hub id or a published BiT name."},
    )
    from_scratch: bool = dataclasses.field(
        default=False,
        metadata={"help": "Train --model's architecture (a preset name or a config) from random weights."},
    )


@dataclasses.dataclass
class DataArguments:
    train_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Image folder: one subfolder per class."}
    )
    validation_dir: str | None = dataclasses.field(default=None, metadata={"help": "Image folder to evaluate on."})
    dataset: str | None = dataclasses.field(default=None, metadata={"help": "A datasets.load_dataset name or folder."})
    dataset_config: str | None = dataclasses.field(default=None, metadata={"help": "Configuration of --dataset."})
    image_column: str = dataclasses.field(default="image", metadata={"help": "Column of --dataset holding images."})
    label_column: str = dataclasses.field(default="label", metadata={"help": "Column of --dataset holding labels."})
    train_split: str = dataclasses.field(default="train", metadata={"help": "Split of --dataset to train on."})
    validation_split: str | None = dataclasses.field(
        default=None, metadata={"help": "Split of --dataset to evaluate on (default: validation/valid/val/test)."}
    )
    streaming: bool = dataclasses.field(
        default=False, metadata={"help": "Stream --dataset instead of downloading it."}
    )
    validation_fraction: float = dataclasses.field(
        default=data_module.DEFAULT_VALIDATION_FRACTION,
        metadata={"help": "Share of each class held out for evaluation when there is no validation split."},
    )
    examples_per_class: int | None = dataclasses.field(
        default=None, metadata={"help": "Few-shot: train on K random examples of every class."}
    )
    trials: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Repeat with N random subsets/seeds; report median, min, max "
            f"(default 1; main job {FEW_SHOT_TRIALS}). The folder keeps the model of the median trial (even N: the lower of the two middle ones)."
        },
    )


@dataclasses.dataclass
class HyperRuleArguments:
    max_steps: int | None = dataclasses.field(default=None, metadata={"help": "Override the rule's steps."})
    warmup_steps: int | None = dataclasses.field(default=None, metadata={"help": "Override the rule's warmup."})
    batch_size: int | None = dataclasses.field(
        default=None, metadata={"help": f"Override the batch (rule: {BATCH_SIZE})."}
    )
    micro_batch_size: int | None = dataclasses.field(
        default=None, metadata={"help": "Images per forward pass (default: chosen to fit the device)."}
    )
    learning_rate: float | None = dataclasses.field(default=None, metadata={"help": "Override the learning rate."})
    resolution: list[int] | None = dataclasses.field(
        default=None, metadata={"help": "PRECROP CROP: override the training resize and crop (test: CROP)."}
    )
    mixup_alpha: float | None = dataclasses.field(default=None, metadata={"help": "Override MixUp's alpha (0: off)."})
    dataset_size: int | None = dataclasses.field(
        default=None, metadata={"help": "Training-set size the rule uses (needed for streams of unknown length)."}
    )
    median_image_area: float | None = dataclasses.field(
        default=None, metadata={"help": "Median image area (pixels) the rule uses, instead of measuring it."}
    )
    bit_l_resolution: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Large images: {}/{} (released code, BiT-L) instead of {}/{}.".format(
                *LARGE_IMAGE_RESOLUTION_BIT_L, *LARGE_IMAGE_RESOLUTION
            )
        },
    )
    no_flip: bool = dataclasses.field(
        default=False,
        metadata={
            "help": f"No random horizontal flip, for orientation labels (paper Appendix B: {', '.join(NO_FLIP_TASKS)})."
        },
    )
    no_crop: bool = dataclasses.field(
        default=False,
        metadata={
            "help": f"No random crop, for counting/location labels (paper Appendix B: {', '.join(NO_CROP_TASKS)})."
        },
    )
    paper_rule: bool = dataclasses.field(
        default=False, metadata={"help": "Main job: run the paper's rule unmodified (no CPU-sized override)."}
    )

    def overrides(self) -> dict:
        """The BitHyperRule fields these arguments set (None: derive from the data)."""
        precrop, crop = (None, None)
        if self.resolution is not None:
            if len(self.resolution) != 2:
                raise FinetuneInputError(f"--resolution takes two numbers, PRECROP CROP; got {self.resolution}.")
            precrop, crop = self.resolution
        values = {
            "steps": self.max_steps,
            "warmup_steps": self.warmup_steps,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "learning_rate": self.learning_rate,
            "precrop": precrop,
            "crop": crop,
            "mixup_alpha": self.mixup_alpha,
            "dataset_size": self.dataset_size,
            "median_image_area": self.median_image_area,
            "random_crop": False if self.no_crop else None,
            "horizontal_flip": False if self.no_flip else None,
        }
        return {name: value for name, value in values.items() if value is not None}

    @property
    def large_resolution(self) -> tuple[int, int]:
        return LARGE_IMAGE_RESOLUTION_BIT_L if self.bit_l_resolution else LARGE_IMAGE_RESOLUTION


@dataclasses.dataclass
class RunArguments:
    output_dir: str | None = dataclasses.field(default=None, metadata={"help": "Folder for the fine-tuned model."})
    resume: bool = dataclasses.field(default=False, metadata={"help": "Continue an interrupted run in --output-dir."})
    overwrite_output_dir: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Replace what --output-dir holds (a finished result, an unfinished run, other files); without it "
            "a non-empty --output-dir is refused."
        },
    )
    push_to_hub: bool = dataclasses.field(
        default=False, metadata={"help": "Upload the folder to the Hugging Face Hub."}
    )
    hub_model_id: str | None = dataclasses.field(
        default=None, metadata={"help": "Hub repository (default: the output folder's name under your account)."}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed of subsets, data order, augmentation, MixUp."})
    num_workers: int = dataclasses.field(
        default=DEFAULT_NUM_WORKERS, metadata={"help": "DataLoader worker processes decoding images."}
    )
    save_steps: int | None = dataclasses.field(
        default=None, metadata={"help": f"Checkpoint every this many steps (default: {CHECKPOINTS_PER_RUN} per run)."}
    )
    per_class_accuracy: bool = dataclasses.field(
        default=False, metadata={"help": "Also report the accuracy of every class."}
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, HyperRuleArguments, RunArguments)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The usage text above as written, defaults after each option."""


def parse_arguments(argv: Sequence[str]) -> tuple[ModelArguments, DataArguments, HyperRuleArguments, RunArguments]:
    parser = HfArgumentParser(
        ARGUMENT_CLASSES, prog="bit-finetune", description=__doc__, formatter_class=_HelpFormatter
    )
    return tuple(parser.parse_args_into_dataclasses(args=list(argv)))


class _StdoutHandler(logging.Handler):
    """Writes to whatever `sys.stdout` is at the time (it may be replaced, e.g. by a capturing caller)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # logging's contract: report through handleError, never raise into the caller
            self.handleError(record)


def configure_logging() -> None:
    """Our messages (the "finetune" loggers) as plain lines on stdout."""
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("finetune")
    if not package_logger.handlers:
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    """Entry point of `bit-finetune`; returns the exit status (2: bad input, 3: saved but not uploaded,
    130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = parse_arguments(argv)
    configure_logging()
    model_args, data_args, rule_args, run_args = arguments
    try:
        if data_args.train_dir is None and data_args.dataset is None:
            from .main_job import run_main_job

            run_main_job(model_args, data_args, rule_args, run_args, argv)
        else:
            run_finetuning(model_args, data_args, rule_args, run_args, argv, callbacks=callbacks)
    except FinetuneInputError as error:
        print(f"bit-finetune: error: {error}", file=sys.stderr)
        return 2
    except HubUploadError as error:
        print(f"bit-finetune: error: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(
            "bit-finetune: interrupted. A fine-tuning run keeps its last checkpoint in OUTPUT_DIR/checkpoints: "
            "run the same command with --resume to continue it.",
            file=sys.stderr,
        )
        return 130
    return 0


# --- A fine-tuning run on the user's data ---------------------------------------------------------


def check_arguments(model_args, data_args, rule_args, run_args) -> None:
    """Combinations that cannot work, refused before anything is loaded."""
    if data_args.train_dir is not None and data_args.dataset is not None:
        raise FinetuneInputError("Give either --train-dir (an image folder) or --dataset (a datasets name), not both.")
    if data_args.validation_dir is not None and data_args.train_dir is None:
        raise FinetuneInputError("--validation-dir goes with --train-dir; with --dataset use --validation-split.")
    if data_args.dataset_config is not None and data_args.dataset is None:
        raise FinetuneInputError("--dataset-config goes with --dataset.")
    if data_args.streaming and data_args.dataset is None:
        raise FinetuneInputError("--streaming goes with --dataset (image folders are read from disk).")
    if model_args.model is None:
        raise FinetuneInputError("--model is required with your own data (a folder, Hub id or published BiT name).")
    if run_args.output_dir is None:
        raise FinetuneInputError("--output-dir is required with your own data.")
    if data_args.trials is not None and data_args.trials < 1:
        raise FinetuneInputError(f"--trials {data_args.trials}: expected at least 1.")
    for flag, value, least in (
        ("--seed", run_args.seed, 0),
        ("--num-workers", run_args.num_workers, 0),
        ("--save-steps", run_args.save_steps, 1),
    ):
        if value is not None and value < least:
            raise FinetuneInputError(f"{flag} {value}: expected an integer of at least {least}.")
    if run_args.hub_model_id is not None and not run_args.push_to_hub:
        raise FinetuneInputError("--hub-model-id goes with --push-to-hub.")
    if rule_args.paper_rule:
        raise FinetuneInputError(
            "--paper-rule belongs to the main job (it drops the job's CPU-sized override); a run on your data already "
            "uses BiT-HyperRule unmodified, except the fields you override."
        )
    if run_args.resume and run_args.overwrite_output_dir:
        raise FinetuneInputError(
            "--resume continues the run in --output-dir, --overwrite-output-dir starts over: give one."
        )
    dataset_only = given_flags(data_args, ("image_column", "label_column", "train_split", "validation_split"))
    if data_args.train_dir is not None and dataset_only:
        raise FinetuneInputError(f"{', '.join(dataset_only)} go(es) with --dataset, not with --train-dir.")
    if data_args.validation_dir is not None and given_flags(data_args, ("validation_fraction",)):
        raise FinetuneInputError(
            "--validation-fraction holds out part of the training set; with --validation-dir nothing is held out."
        )


def given_flags(arguments, names: Sequence[str]) -> list[str]:
    """The command-line flags among the fields `names` of `arguments` that differ from their defaults."""
    defaults = {field.name: field.default for field in dataclasses.fields(arguments)}
    return [f"--{name.replace('_', '-')}" for name in names if getattr(arguments, name) != defaults[name]]


def check_output_dir(output_dir: Path, run_args, run_record: dict) -> None:
    """Refuse to overwrite what --output-dir holds unless asked; on --resume, refuse different arguments.
    Reads only: nothing is written or removed until the whole input has been checked."""
    run_file = output_dir / WORK_DIR_NAME / RUN_FILE_NAME
    replace = "pass --overwrite-output-dir to replace it, or choose another --output-dir"
    if run_file.is_file() and not run_args.overwrite_output_dir:
        if not run_args.resume:
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
        changed = sorted(
            key
            for key in set(previous) | set(run_record)
            if key not in RESUME_MAY_CHANGE and previous.get(key) != run_record.get(key)
        )
        if changed:
            raise FinetuneInputError(
                f"--resume continues the run in {output_dir} with its own arguments, but these differ: "
                + ", ".join(f"{key} (was {previous.get(key)!r}, now {run_record.get(key)!r})" for key in changed)
            )
        return
    nearest_existing = next(path for path in (output_dir, *output_dir.absolute().parents) if path.exists())
    if not nearest_existing.is_dir():
        raise FinetuneInputError(
            f"--output-dir {output_dir}: {nearest_existing} is a file; expected a folder (new or empty)."
        )
    if run_args.overwrite_output_dir or not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if is_finished_folder(output_dir):
        raise FinetuneInputError(f"{output_dir} already holds a fine-tuned model (a finished run); {replace}.")
    raise FinetuneInputError(f"{output_dir} exists and is not empty; {replace}.")


def start_run(work_dir: Path, run_args, run_record: dict) -> None:
    """Record the run's arguments (what --resume compares against) before its first training step; with
    --overwrite-output-dir an earlier unfinished run is discarded first. The main process writes; the others
    wait for it, so none of them trains into a folder being removed."""
    state = PartialState()
    run_file = work_dir / RUN_FILE_NAME
    if state.is_main_process and (run_args.overwrite_output_dir or not run_file.is_file()):
        if work_dir.exists():
            shutil.rmtree(work_dir)
        atomic_write_json(run_file, run_record)
    state.wait_for_everyone()


def load_data(data_args, run_args) -> data_module.ImageClassificationData:
    if data_args.train_dir is not None:
        return data_module.load_image_folders(
            data_args.train_dir,
            data_args.validation_dir,
            validation_fraction=data_args.validation_fraction,
            seed=run_args.seed,
        )
    return data_module.load_hub_dataset(
        data_args.dataset,
        data_args.dataset_config,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        train_split=data_args.train_split,
        validation_split=data_args.validation_split,
        streaming=data_args.streaming,
        validation_fraction=data_args.validation_fraction,
        seed=run_args.seed,
    )


def training_set_size(data: data_module.ImageClassificationData, data_args, rule_args) -> int:
    """Examples one trial trains on: K x classes for few-shot, the training split otherwise."""
    if data_args.examples_per_class is not None:
        return data_args.examples_per_class * data.num_classes
    if not data.streaming:
        return len(data.train)
    if rule_args.dataset_size is not None:
        return rule_args.dataset_size
    split = (data.train.info.splits or {}).get(data_args.train_split)
    if split is None or not split.num_examples:
        raise FinetuneInputError(
            "The stream does not declare its number of examples, which BiT-HyperRule's schedule depends on; "
            "pass --dataset-size N."
        )
    return split.num_examples


def load_trial_result(trial_dir: Path) -> RunResult | None:
    path = trial_dir / TRIAL_RESULT_FILE_NAME
    return RunResult(**json.loads(path.read_text())) if path.is_file() else None


def run_finetuning(
    model_args: ModelArguments,
    data_args: DataArguments,
    rule_args: HyperRuleArguments,
    run_args: RunArguments,
    argv: Sequence[str],
    callbacks: Sequence[TrainerCallback] = (),
) -> Path:
    """Fine-tune on the user's data with BiT-HyperRule; write and optionally upload the output folder.

    Every input (arguments, output folder, data, model, the rule, the evaluation images) is checked before
    anything is written; in a multi-process run only the main process writes the folder and uploads it.
    """
    check_arguments(model_args, data_args, rule_args, run_args)
    output_dir = Path(run_args.output_dir)
    work_dir = output_dir / WORK_DIR_NAME
    run_record = {
        name: value
        for arguments in (model_args, data_args, rule_args, run_args)
        for name, value in dataclasses.asdict(arguments).items()
    }
    check_output_dir(output_dir, run_args, run_record)
    data, rule, model = plan_run(model_args, data_args, rule_args, run_args)
    eval_dataset, eval_unreadable = evaluation_inputs(data.eval, rule.crop, num_workers=run_args.num_workers)
    if run_args.resume and (work_dir / RUN_FILE_NAME).is_file():
        logger.info("Resuming the run in %s.", output_dir)
    elif run_args.resume:
        logger.info("Nothing to resume in %s; starting the run.", output_dir)

    def begin() -> None:
        start_run(work_dir, run_args, run_record)

    results = run_trials(
        model, data, rule, (eval_dataset, eval_unreadable), model_args, data_args, run_args, work_dir, begin, callbacks
    )
    if not PartialState().is_main_process:
        return output_dir
    saved = median_trial([result.accuracy for result in results])
    eval_results, unreadable = assemble_output(
        output_dir, work_dir, saved, results, data, rule, model_args, data_args, argv
    )
    report(output_dir, eval_results, unreadable, saved)
    if run_args.push_to_hub:
        logger.info("Uploaded to the Hub as %s", push_to_hub(output_dir, run_args.hub_model_id))
    return output_dir


def plan_run(model_args, data_args, rule_args, run_args):
    """(data, BiT-HyperRule for it with the micro-batch chosen, the first trial's model); nothing written yet."""
    data = load_data(data_args, run_args)
    data_module.check_classes(data)
    if data_args.examples_per_class is not None:
        data_module.few_shot_subset(data, data_args.examples_per_class, run_args.seed)  # K too large fails here
    for announcement in data.announcements:
        logger.info(announcement)
    overrides = rule_args.overrides()
    num_train = training_set_size(data, data_args, rule_args)
    if "median_image_area" in overrides:
        area = overrides["median_image_area"]
    else:
        area, measured = data_module.median_image_area(data.train, seed=run_args.seed)
        logger.info("Median image area %s px, read from the headers of %d training images.", f"{area:,.0f}", measured)
    rule = BitHyperRule.from_dataset(num_train, area, large_resolution=rule_args.large_resolution, **overrides)
    state = PartialState()
    model = load_model_for_labels(
        model_args.model, data.label_names, from_scratch=model_args.from_scratch, seed=run_args.seed
    )
    if rule.micro_batch_size is None:
        micro = choose_micro_batch_size(
            model, rule.crop, rule.batch_size, state.device, world_size=state.num_processes
        )
        rule = rule.with_micro_batch_size(micro)
    rule.gradient_accumulation_steps(state.num_processes)  # a batch the micro-batches cannot make fails here
    logger.info(rule.describe(world_size=state.num_processes))
    warning = mixup_micro_batch_warning(rule.mixup_alpha, rule.micro_batch_size)
    if warning:
        logger.warning(warning)
    return data, rule, model


def run_trials(
    model, data, rule, evaluation, model_args, data_args, run_args, work_dir, begin, callbacks
) -> list[RunResult]:
    """Train and evaluate every trial not finished yet (trial n, from 1, in work_dir/trial-n, resumable).

    `model` is trial 1's (already loaded); `evaluation` is (evaluation dataset, its unreadable images);
    `begin()` is called once, before the first training step.
    """
    trials = data_args.trials or 1
    begun = False
    eval_dataset, eval_unreadable = evaluation
    results: list[RunResult] = []
    for trial in range(1, trials + 1):
        trial_dir = work_dir / f"trial-{trial}"
        finished = load_trial_result(trial_dir) if run_args.resume else None  # else start_run discards them
        if finished is not None:
            logger.info("Trial %d of %d already finished: accuracy %.4f.", trial, trials, finished.accuracy)
            results.append(finished)
            continue
        seed = run_args.seed + trial - 1
        train = data.train
        if data_args.examples_per_class is not None:
            train = data_module.few_shot_subset(data, data_args.examples_per_class, seed).train
        if model is None:
            model = load_model_for_labels(
                model_args.model, data.label_names, from_scratch=model_args.from_scratch, seed=seed
            )
        train_dataset, train_unreadable = training_inputs(train, rule, seed=seed, num_workers=run_args.num_workers)
        if not begun:
            begin()
            begun = True
        if trials > 1:
            logger.info("Trial %d of %d (seed %d).", trial, trials, seed)
        extra = {"save_steps": run_args.save_steps} if run_args.save_steps else {}
        trainer, result = train_and_evaluate(
            model,
            rule,
            train_dataset,
            eval_dataset,
            data.label_names,
            output_dir=trial_dir,
            seed=seed,
            num_workers=run_args.num_workers,
            resume=run_args.resume,
            per_class_accuracy=run_args.per_class_accuracy,
            callbacks=callbacks,
            **extra,
        )
        model = None  # every trial starts from freshly loaded weights
        result.unreadable_images = sorted(set(result.unreadable_images) | set(train_unreadable) | set(eval_unreadable))
        trainer.save_model(str(trial_dir / "model"))
        if trainer.is_world_process_zero():
            atomic_write_json(trial_dir / TRIAL_RESULT_FILE_NAME, dataclasses.asdict(result))
        logger.info("Trial %d of %d: accuracy %.4f.", trial, trials, result.accuracy)
        results.append(result)
    return results


def assemble_output(output_dir, work_dir, saved, results, data, rule, model_args, data_args, argv):
    """Write the output folder from trial `saved`'s model (numbered from 1); (its eval results, the
    unreadable images). With trials, `eval_accuracy` is their median and the other eval metrics are the
    saved trial's; `eval_accuracy_saved_trial` is its accuracy and `saved_trial` its number."""
    chosen = results[saved - 1]
    eval_results = dict(chosen.eval_metrics)
    all_results = dict(chosen.train_metrics)
    if len(results) > 1:
        eval_results.update(trial_summary([result.accuracy for result in results]))
        eval_results["eval_accuracy_saved_trial"] = chosen.accuracy
        all_results["saved_trial"] = saved
    unreadable = sorted({name for result in results for name in result.unreadable_images})
    all_results.update(eval_results, unreadable_images=len(unreadable))
    dataset_record = {
        **data.source,
        "num_train_examples": chosen.num_train_examples,
        "num_eval_examples": chosen.num_eval_examples,
        "num_classes": data.num_classes,
        "examples_per_class": data_args.examples_per_class,
        "trials": len(results),
    }
    finetune_args = {
        "command": ["bit-finetune", *argv],
        "model": model_args.model,
        # A local folder wins over a Hub repo of the same name (from_pretrained), and a relative path reads like a
        # Hub id: say which it was, so a model card links a Hub base model only when there is one.
        "model_is_local_folder": Path(model_args.model).is_dir(),
        "dataset": dataset_record,
        "from_scratch": model_args.from_scratch,
        "unreadable_images": unreadable,
    }
    write_output_folder(
        output_dir,
        work_dir / f"trial-{saved}" / "model",
        rule,
        eval_results=eval_results,
        all_results=all_results,
        finetune_args=finetune_args,
        log_history=chosen.log_history,
    )
    return eval_results, unreadable


def report(output_dir: Path, eval_results: dict, unreadable: list[str], saved: int) -> None:
    if unreadable:
        logger.info("Skipped %d unreadable image(s): %s", len(unreadable), ", ".join(unreadable))
    accuracy = eval_results["eval_accuracy"]
    trials = len(eval_results.get("eval_accuracy_trials", [accuracy]))
    top_5 = eval_results.get("eval_top_5_accuracy")
    if trials > 1:
        logger.info(
            "Accuracy over %d trials: median %.4f (min %.4f, max %.4f).",
            trials,
            accuracy,
            eval_results["eval_accuracy_min"],
            eval_results["eval_accuracy_max"],
        )
        which = "the median" if trials % 2 else "the lower of the two middle ones, whose mean is the median"
        logger.info(
            "Saved the model of trial %d of %d: accuracy %.4f, %s%s.",
            saved,
            trials,
            eval_results["eval_accuracy_saved_trial"],
            which,
            f"; its top-5 accuracy {top_5:.4f}" if top_5 is not None else "",
        )
    else:
        logger.info("Accuracy %.4f.", accuracy)
        if top_5 is not None:
            logger.info("Top-5 accuracy %.4f.", top_5)
    logger.info("Saved the fine-tuned model in %s", output_dir)
