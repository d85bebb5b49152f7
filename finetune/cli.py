"""`bit-finetune` (also `python -m finetune`): fine-tune a BiT model on your images with BiT-HyperRule.

  bit-finetune --model M --train-dir D [--validation-dir V] --output-dir O [--examples-per-class K]
      [--trials N] [--max-steps S] [--batch-size B] [--micro-batch-size b] [--learning-rate LR]
      [--resolution PRECROP CROP] [--mixup-alpha A] [--no-flip] [--no-crop]
      [--push-to-hub [--hub-model-id ID]] [--resume]
  bit-finetune --model M --dataset NAME [--dataset-config C] [--image-column image] [--label-column label]
      [--streaming] --output-dir O ...
  bit-finetune             the main job: the embedded upstream checkpoint vs random init on
                           scikit-learn's digits, 1/5/10 examples per class and the full set

M is anything `from_pretrained` takes (a saved folder, a Hub id, a published BiT name), or with
--from-scratch a preset name (bit-tiny, BiT-M-R50x1, ...) trained from random weights. Every number not
given is BiT-HyperRule's, derived from the training data; the ones given are recorded as overrides in
O/bit_hyperrule.json.
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
    median_trial,
    push_to_hub,
    train_and_evaluate,
    training_inputs,
    trial_summary,
    write_output_folder,
)
from .hyperrule import (
    LARGE_IMAGE_RESOLUTION,
    LARGE_IMAGE_RESOLUTION_BIT_L,
    NO_CROP_TASKS,
    NO_FLIP_TASKS,
    BitHyperRule,
    choose_micro_batch_size,
)
from .models import load_model_for_labels

logger = logging.getLogger("finetune")

DEFAULT_NUM_WORKERS = min(4, os.cpu_count() or 1)
# Inside the output folder while a run is unfinished: one Trainer output folder per trial (checkpoints,
# the trial's final model and result), removed once the output folder is complete.
WORK_DIR_NAME = "checkpoints"
RUN_FILE_NAME = "run.json"
TRIAL_RESULT_FILE_NAME = "result.json"
# Arguments that may differ between an interrupted run and its --resume.
RESUME_MAY_CHANGE = frozenset({"resume", "push_to_hub", "hub_model_id", "num_workers"})


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
    train_dir: str | None = dataclasses.field(default=None, metadata={"help": "Image folder: one subfolder per class."})
    validation_dir: str | None = dataclasses.field(default=None, metadata={"help": "Image folder to evaluate on."})
    dataset: str | None = dataclasses.field(default=None, metadata={"help": "A datasets.load_dataset name or folder."})
    dataset_config: str | None = dataclasses.field(default=None, metadata={"help": "Configuration of --dataset."})
    image_column: str = dataclasses.field(default="image", metadata={"help": "Column of --dataset holding images."})
    label_column: str = dataclasses.field(default="label", metadata={"help": "Column of --dataset holding labels."})
    train_split: str = dataclasses.field(default="train", metadata={"help": "Split of --dataset to train on."})
    validation_split: str | None = dataclasses.field(
        default=None, metadata={"help": "Split of --dataset to evaluate on (default: validation/valid/val/test)."}
    )
    streaming: bool = dataclasses.field(default=False, metadata={"help": "Stream --dataset instead of downloading it."})
    validation_fraction: float = dataclasses.field(
        default=data_module.DEFAULT_VALIDATION_FRACTION,
        metadata={"help": "Share of each class held out for evaluation when there is no validation split."},
    )
    examples_per_class: int | None = dataclasses.field(
        default=None, metadata={"help": "Few-shot: train on K random examples of every class."}
    )
    trials: int | None = dataclasses.field(
        default=None,
        metadata={"help": "Repeat with N random subsets/seeds; report median, min, max (default 1; main job 5)."},
    )


@dataclasses.dataclass
class HyperRuleArguments:
    max_steps: int | None = dataclasses.field(default=None, metadata={"help": "Override the rule's steps."})
    warmup_steps: int | None = dataclasses.field(default=None, metadata={"help": "Override the rule's warmup."})
    batch_size: int | None = dataclasses.field(default=None, metadata={"help": "Override the batch (rule: 512)."})
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
        default=False, metadata={"help": "Large images: 512/480 (released code, BiT-L) instead of 448/384."}
    )
    no_flip: bool = dataclasses.field(
        default=False,
        metadata={
            "help": f"No random horizontal flip, for orientation labels (paper App. B: {', '.join(NO_FLIP_TASKS)})."
        },
    )
    no_crop: bool = dataclasses.field(
        default=False,
        metadata={"help": f"No random crop, for counting/location labels (paper App. B: {', '.join(NO_CROP_TASKS)})."},
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
        }
        return {name: value for name, value in values.items() if value is not None}

    @property
    def large_resolution(self) -> tuple[int, int]:
        return LARGE_IMAGE_RESOLUTION_BIT_L if self.bit_l_resolution else LARGE_IMAGE_RESOLUTION


@dataclasses.dataclass
class RunArguments:
    output_dir: str | None = dataclasses.field(default=None, metadata={"help": "Folder for the fine-tuned model."})
    resume: bool = dataclasses.field(default=False, metadata={"help": "Continue an interrupted run in --output-dir."})
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
        default=None, metadata={"help": "Checkpoint every this many steps (default: 10 per run)."}
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


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time (it may be replaced, e.g. by a capturing caller)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


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
    if run_args.hub_model_id is not None and not run_args.push_to_hub:
        raise FinetuneInputError("--hub-model-id goes with --push-to-hub.")
    if rule_args.paper_rule and rule_args.overrides():
        raise FinetuneInputError(
            f"--paper-rule runs BiT-HyperRule unmodified, but these fields are overridden: {sorted(rule_args.overrides())}."
        )


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


def prepare_work_dir(work_dir: Path, resume: bool, run_record: dict) -> None:
    """Refuse to overwrite an unfinished run; on --resume, refuse different arguments."""
    run_file = work_dir / RUN_FILE_NAME
    if run_file.is_file():
        if not resume:
            raise FinetuneInputError(
                f"{work_dir.parent} holds an unfinished run ({work_dir}); pass --resume to continue it, or remove "
                f"{work_dir} to start over."
            )
        previous = json.loads(run_file.read_text())
        changed = sorted(
            key
            for key in set(previous) | set(run_record)
            if key not in RESUME_MAY_CHANGE and previous.get(key) != run_record.get(key)
        )
        if changed:
            raise FinetuneInputError(
                f"--resume continues the run in {work_dir.parent} with its own arguments, but these differ: "
                + ", ".join(f"{key} (was {previous.get(key)!r}, now {run_record.get(key)!r})" for key in changed)
            )
        logger.info("Resuming the run in %s.", work_dir.parent)
        return
    if resume:
        logger.info("Nothing to resume in %s; starting the run.", work_dir.parent)
    atomic_write_json(run_file, run_record)


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
    """Fine-tune on the user's data with BiT-HyperRule; write and optionally upload the output folder."""
    check_arguments(model_args, data_args, rule_args, run_args)
    output_dir = Path(run_args.output_dir)
    work_dir = output_dir / WORK_DIR_NAME
    data, rule, model = plan_run(model_args, data_args, rule_args, run_args)

    work_dir.mkdir(parents=True, exist_ok=True)
    run_record = {
        name: value
        for arguments in (model_args, data_args, rule_args, run_args)
        for name, value in dataclasses.asdict(arguments).items()
    }
    prepare_work_dir(work_dir, run_args.resume, run_record)
    results = run_trials(model, data, rule, model_args, data_args, rule_args, run_args, work_dir, callbacks)

    saved = median_trial([result.accuracy for result in results])
    eval_results, unreadable = assemble_output(output_dir, work_dir, saved, results, data, rule, model_args, data_args, argv)
    shutil.rmtree(work_dir)
    report(output_dir, eval_results, unreadable, len(results))
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
    model = load_model_for_labels(model_args.model, data.label_names, from_scratch=model_args.from_scratch)
    if rule.micro_batch_size is None:
        micro = choose_micro_batch_size(model, rule.crop, rule.batch_size, state.device, world_size=state.num_processes)
        rule = rule.with_micro_batch_size(micro)
    logger.info(rule.describe(world_size=state.num_processes))
    return data, rule, model


def run_trials(model, data, rule, model_args, data_args, rule_args, run_args, work_dir, callbacks) -> list[RunResult]:
    """Train and evaluate every trial not finished yet (each in work_dir/trial-i, resumable)."""
    trials = data_args.trials or 1
    eval_dataset, eval_unreadable = evaluation_inputs(data.eval, rule.crop, num_workers=run_args.num_workers)
    results: list[RunResult] = []
    for trial in range(trials):
        trial_dir = work_dir / f"trial-{trial}"
        finished = load_trial_result(trial_dir)
        if finished is not None:
            logger.info("Trial %d already finished: accuracy %.4f.", trial, finished.accuracy)
            results.append(finished)
            continue
        seed = run_args.seed + trial
        train = data.train
        if data_args.examples_per_class is not None:
            train = data_module.few_shot_subset(data, data_args.examples_per_class, seed).train
        if model is None:
            model = load_model_for_labels(model_args.model, data.label_names, from_scratch=model_args.from_scratch)
        train_dataset, train_unreadable = training_inputs(
            train,
            rule,
            seed=seed,
            flip=not rule_args.no_flip,
            random_crop=not rule_args.no_crop,
            num_workers=run_args.num_workers,
        )
        if trials > 1:
            logger.info("Trial %d of %d (seed %d).", trial + 1, trials, seed)
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
        atomic_write_json(trial_dir / TRIAL_RESULT_FILE_NAME, dataclasses.asdict(result))
        logger.info("Trial %d: accuracy %.4f.", trial, result.accuracy)
        results.append(result)
    return results


def assemble_output(output_dir, work_dir, saved, results, data, rule, model_args, data_args, argv):
    """Write the output folder from trial `saved`'s model; (its eval results, the unreadable images)."""
    chosen = results[saved]
    eval_results = dict(chosen.eval_metrics)
    all_results = dict(chosen.train_metrics)
    if len(results) > 1:
        eval_results.update(trial_summary([result.accuracy for result in results]))
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


def report(output_dir: Path, eval_results: dict, unreadable: list[str], trials: int) -> None:
    if unreadable:
        logger.info("Skipped %d unreadable image(s): %s", len(unreadable), ", ".join(unreadable))
    accuracy = eval_results["eval_accuracy"]
    if trials > 1:
        logger.info(
            "Accuracy over %d trials: median %.4f (min %.4f, max %.4f).",
            trials,
            accuracy,
            eval_results["eval_accuracy_min"],
            eval_results["eval_accuracy_max"],
        )
    else:
        logger.info("Accuracy %.4f.", accuracy)
    if "eval_top_5_accuracy" in eval_results:
        logger.info("Top-5 accuracy %.4f.", eval_results["eval_top_5_accuracy"])
    logger.info("Saved the fine-tuned model in %s", output_dir)
