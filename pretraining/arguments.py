"""The command line of `pretrain.py`: four groups of flags (HfArgumentParser dataclasses), checked up front.

Every recipe value has a flag whose default (None) means the paper's value (`pretraining.recipe`); the
help shows dash spellings (the underscore ones are accepted too, as in the HF examples) and each default
once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
from typing import Literal

from accelerate.utils import is_tensorboard_available, is_trackio_available
from transformers import HfArgumentParser

from image_data import InputError
from modeling_bit import BitConfig
from modeling_bit.configuration_bit import canonical_preset_name
from modeling_bit.modeling_bit import MIN_IMAGE_SIZE

from .recipe import (
    BASE_LEARNING_RATE,
    BASE_LEARNING_RATE_BATCH_SIZE,
    CROP_AREA_RANGE,
    CROP_ASPECT_RATIO_RANGE,
    DEFAULT_SCHEDULE,
    GLOBAL_BATCH_SIZE,
    HORIZONTAL_FLIP_PROBABILITY,
    IMAGE_SIZE,
    LEARNING_RATE_DECAY_FACTOR,
    MOMENTUM,
    MULTI_LABEL_HEAD_BIAS,
    SCHEDULES,
    WARMUP_FRACTION,
    WARMUP_STEPS,
    WEIGHT_DECAY,
    Recipe,
    recipe_for_schedule,
)

DESCRIPTION = """\
Pre-train a BiT network upstream with the paper's recipe (docs/recipe.md), from one CPU to many GPUs or TPU cores:

  python pretraining/pretrain.py --model-preset bit-tiny --train-dir DIR --output-dir O --max-steps 100
  torchrun --nproc_per_node 2 pretraining/pretrain.py --model-preset bit-tiny --train-dir DIR --output-dir O
  accelerate launch --multi_gpu --num_processes 2 pretraining/pretrain.py ...   (2 processes, on GPUs or CPUs)
  accelerate launch --config_file pretraining/configs/multi_gpu.yaml pretraining/pretrain.py \\
      --model-preset BiT-M-R101x3 --dataset NAME --streaming --num-train-examples 14197122 --output-dir O
  ... --resume-from-checkpoint latest   (continue an interrupted run exactly, with the same launcher)

Writes O/checkpoints/step-N, O/training_log.jsonl, O/probe_results.json and O/final (a save_pretrained folder
with its image processor, bit_pretraining.json, the logs and a model card). Recipe values default to the
paper's; the run prints what differs from the paper."""


def _show_range(values) -> str:
    return " ".join(f"{value:.3g}" for value in values)


def _describe_schedules() -> str:
    return "; ".join(
        f"{name}: {schedule.epochs:g} epochs, decays after {'/'.join(f'{e:g}' for e in schedule.decay_epochs)}"
        for name, schedule in SCHEDULES.items()
    )


def _field(default=None, help: str = "", **metadata):
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _required(help: str, metavar: str):
    return dataclasses.field(metadata={"help": help, "metavar": metavar})


@dataclasses.dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_preset: str = _required(
        "BiT architecture: BiT-{S,M}-R{50x1,...,152x4}, bit-tiny, bit-small (case-insensitive).", "PRESET"
    )
    image_size: int = _field(
        IMAGE_SIZE, "Training resolution in pixels (default: %(default)s, the paper's).", metavar="PIXELS"
    )
    multi_label: bool = _field(
        False, "Labels are lists of class ids: per-class sigmoid loss, head bias --multi-label-head-bias."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] | None = _field(
        None, "Autocast precision (default: the accelerate config's, else none)."
    )
    gradient_checkpointing: bool = _field(False, "Recompute activations in backward: less memory, ~1/3 more compute.")
    channels_last: bool = _field(False, "NHWC memory layout (faster on GPUs).")


@dataclasses.dataclass
class DataArguments:
    _argument_group_name = "data (give --train-dir or --dataset)"

    train_dir: str | None = _field(
        None, "Image folder: one subfolder per class (a validation/ split folder is the held-out set).", metavar="DIR"
    )
    dataset: str | None = _field(
        None, "A datasets name: Hub id, local folder of parquet/webdataset shards, or builder.", metavar="NAME"
    )
    dataset_config: str | None = _field(None, "Configuration of --dataset.", metavar="CONFIG")
    data_files: list[str] | None = _field(None, "Files or globs for --dataset.", metavar="FILE")
    streaming: bool = _field(False, "Stream the data (shards split between processes) instead of caching it.")
    train_split: str = _field("train", "Split to train on.", metavar="SPLIT")
    validation_split: str | None = _field(
        None,
        "Held-out split (default: validation, valid, val or test if present, else a slice of the training split).",
        metavar="SPLIT",
    )
    validation_examples: int = _field(
        10000,
        "Held-out slice taken from the training split when there is no validation split (at most a tenth).",
        metavar="N",
    )
    image_column: str | None = _field(None, "Default: the Image column, else image/img/jpg/png/webp.", metavar="NAME")
    label_column: str | None = _field(
        None, "Default: the ClassLabel column, else label/labels/cls/class/target.", metavar="NAME"
    )
    num_labels: int | None = _field(None, "Number of classes, if the data does not declare them.", metavar="N")
    num_train_examples: int | None = _field(
        None, "Size of a streamed training set (turns epochs into steps).", metavar="N"
    )
    shuffle_buffer_size: int = _field(
        10000,
        "Streaming: each DataLoader worker shuffles its examples in windows of this many (a resume re-reads at most "
        "one window).",
        metavar="N",
    )
    dataloader_num_workers: int = _field(2, "Decoding processes per training process.", metavar="N")
    cache_dir: str | None = _field(None, "datasets cache folder.", metavar="DIR")


@dataclasses.dataclass
class RecipeArguments:
    _argument_group_name = "length, batch and recipe (a value not given is the paper's)"

    max_steps: int | None = _field(
        None,
        "Train for this many optimizer steps; the decays and the warmup keep their share of the run.",
        metavar="N",
    )
    epochs: float | None = _field(None, "Train for this many epochs (default: the --schedule's).", metavar="E")
    schedule: Literal["bit-s", "bit-m", "bit-l"] = _field(DEFAULT_SCHEDULE, _describe_schedules() + ".")
    global_batch_size: int = _field(
        GLOBAL_BATCH_SIZE,
        "Images per optimizer step over all processes = per-device batch x processes x accumulation (derived).",
        metavar="N",
    )
    per_device_batch_size: int = _field(32, "Images per forward pass on each process.", metavar="N")
    base_learning_rate: float | None = _field(
        None, f"Learning rate at --base-learning-rate-batch-size images (paper: {BASE_LEARNING_RATE:g}).", metavar="LR"
    )
    base_learning_rate_batch_size: int | None = _field(
        None,
        f"The peak learning rate is the base one x global batch / this (paper: {BASE_LEARNING_RATE_BATCH_SIZE}).",
        metavar="N",
    )
    warmup_steps: int | None = _field(
        None,
        f"Linear warmup steps (paper: {WARMUP_STEPS}; with --max-steps or --epochs, the same share of the run as "
        f"in BiT-M's run, {100 * WARMUP_FRACTION:.1f} %%).",
        metavar="N",
    )
    decay_epochs: list[float] | None = _field(
        None, "Epochs after which the learning rate decays (default: the --schedule's).", metavar="E"
    )
    learning_rate_decay_factor: float | None = _field(
        None, f"Factor of each decay (paper: {LEARNING_RATE_DECAY_FACTOR:g}).", metavar="F"
    )
    weight_decay: float | None = _field(None, f"Paper: {WEIGHT_DECAY:g}.", metavar="WD")
    momentum: float | None = _field(None, f"SGD momentum (paper: {MOMENTUM:g}).", metavar="M")
    crop_area_range: list[float] | None = _field(
        None, f"Inception crop: area fraction (paper: {_show_range(CROP_AREA_RANGE)}).", metavar="LOW HIGH"
    )
    crop_aspect_ratio_range: list[float] | None = _field(
        None, f"Inception crop: aspect ratio (paper: {_show_range(CROP_ASPECT_RATIO_RANGE)}).", metavar="LOW HIGH"
    )
    horizontal_flip_probability: float | None = _field(None, f"Paper: {HORIZONTAL_FLIP_PROBABILITY:g}.", metavar="P")
    multi_label_head_bias: float | None = _field(
        None, f"Initial head bias with --multi-label (default: {MULTI_LABEL_HEAD_BIAS:g}).", metavar="B"
    )


@dataclasses.dataclass
class RunArguments:
    _argument_group_name = "output, checkpoints, logs and probes"

    output_dir: str = _required(
        "Checkpoints, logs and the final model (O/final): a new or empty folder, or this run's.", "O"
    )
    seed: int = _field(0, "Seeds the initialisation, the data order and the augmentation.", metavar="N")
    checkpoint_every: int = _field(
        1000, "Save a checkpoint every N steps (and at the end, and when stopped).", metavar="N"
    )
    keep_checkpoints: int = _field(3, "Keep the newest N checkpoints.", metavar="N")
    resume_from_checkpoint: str | None = _field(
        None, "'latest' (the newest in --output-dir, or start afresh) or a checkpoint folder.", metavar="latest|PATH"
    )
    overwrite_output_dir: bool = _field(
        False, "Start afresh in an --output-dir that holds another run's checkpoints: delete them first."
    )
    logging_steps: int = _field(50, "Log loss, learning rate and throughput every N steps.", metavar="N")
    probe_every: int = _field(0, "Few-shot probe on held-out images every N steps (0: only at the end).", metavar="N")
    probe_examples_per_class: int = _field(20, "Held-out images per probe class.", metavar="N")
    probe_classes: int = _field(100, "Classes in the few-shot probe.", metavar="N")
    report_to: Literal["none", "tensorboard", "trackio", "all"] = _field("none", "Experiment tracker (if installed).")


@dataclasses.dataclass
class PretrainingArguments:
    """One run's arguments, by group."""

    model: ModelArguments
    data: DataArguments
    recipe: RecipeArguments
    run: RunArguments


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; each flag once, in its dash spelling, with its metavar once; defaults shown
    once, and only when there is one."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34, width=min(shutil.get_terminal_size().columns, 120) - 2)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        shown = ", ".join(option for option in action.option_strings if "_" not in option)
        if action.nargs == 0 or (action.nargs == "?" and action.const is True):  # a switch
            return shown
        if action.nargs == "+" and " " in str(action.metavar):  # LOW HIGH: a fixed number of values, as named
            return f"{shown} {action.metavar}"
        return f"{shown} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not (unset or action.required or "(default" in text):
            text += " (default: %(default)s)"
        return text


ARGUMENT_GROUPS = (ModelArguments, DataArguments, RecipeArguments, RunArguments)


USAGE = "%(prog)s --model-preset PRESET (--train-dir DIR | --dataset NAME) --output-dir O [options]"


def argument_parser() -> HfArgumentParser:
    return HfArgumentParser(ARGUMENT_GROUPS, usage=USAGE, description=DESCRIPTION, formatter_class=HelpFormatter)


def parse_arguments(argv: list[str] | None = None) -> PretrainingArguments:
    return PretrainingArguments(*argument_parser().parse_args_into_dataclasses(args=argv))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_arguments(arguments: PretrainingArguments) -> None:
    """Refuse bad values and combinations before any data is read or any process group is used."""
    model, data, recipe, run = arguments.model, arguments.data, arguments.recipe, arguments.run
    if canonical_preset_name(model.model_preset) is None:
        raise InputError(
            f"Unknown --model-preset {model.model_preset!r}: expected one of {', '.join(BitConfig.preset_names())}."
        )
    if model.image_size < MIN_IMAGE_SIZE:
        raise InputError(f"--image-size {model.image_size}: BiT needs at least {MIN_IMAGE_SIZE} pixels.")
    if (data.train_dir is None) == (data.dataset is None):
        raise InputError("Give exactly one of --train-dir (an image folder) and --dataset (a datasets name or path).")
    if recipe.max_steps is not None and recipe.epochs is not None:
        raise InputError("Give --max-steps or --epochs, not both.")
    if run.overwrite_output_dir and run.resume_from_checkpoint is not None:
        raise InputError(
            "--overwrite-output-dir deletes the checkpoints a --resume-from-checkpoint would continue: give one."
        )
    at_least_one = [
        (run, "checkpoint_every"),
        (run, "keep_checkpoints"),
        (run, "logging_steps"),
        (recipe, "per_device_batch_size"),
        (recipe, "global_batch_size"),
        (data, "shuffle_buffer_size"),
    ]
    at_least_one += [
        (group, name)
        for group, name in (
            (recipe, "max_steps"),
            (data, "num_train_examples"),
            (run, "probe_examples_per_class"),
            (run, "probe_classes"),
            (recipe, "base_learning_rate_batch_size"),
        )
        if getattr(group, name) is not None
    ]
    for group, name in at_least_one:
        if getattr(group, name) < 1:
            raise InputError(f"{_flag(name)} {getattr(group, name)}: expected at least 1.")
    for group, name in (
        (run, "probe_every"),
        (data, "validation_examples"),
        (data, "dataloader_num_workers"),
        (recipe, "warmup_steps"),
        (run, "seed"),
    ):
        if getattr(group, name) is not None and getattr(group, name) < 0:
            raise InputError(f"{_flag(name)} {getattr(group, name)}: expected 0 or more.")
    for name in (
        "base_learning_rate",
        "weight_decay",
        "momentum",
        "multi_label_head_bias",
        "epochs",
        "horizontal_flip_probability",
        "learning_rate_decay_factor",
    ):
        value = getattr(recipe, name)
        if value is not None and not math.isfinite(value):
            raise InputError(f"{_flag(name)} {value}: expected a finite number.")
    _check_recipe_values(recipe)
    if run.report_to in ("tensorboard", "all") and not is_tensorboard_available():
        raise InputError("--report-to tensorboard needs tensorboard: pip install tensorboard.")
    if run.report_to in ("trackio", "all") and not is_trackio_available():
        raise InputError("--report-to trackio needs trackio: pip install trackio.")


def _check_recipe_values(recipe: RecipeArguments) -> None:
    ranges = {
        "crop_area_range": (
            lambda low, high: 0 < low <= high <= 1,
            "expected LOW HIGH with 0 < LOW <= HIGH <= 1",
        ),
        "crop_aspect_ratio_range": (lambda low, high: 0 < low <= high, "expected LOW HIGH with 0 < LOW <= HIGH"),
    }
    for name, (valid, expected) in ranges.items():
        value = getattr(recipe, name)
        if value is not None and not (len(value) == 2 and valid(*value)):
            raise InputError(f"{_flag(name)} {value}: {expected}.")
    intervals = {
        "horizontal_flip_probability": (lambda v: 0 <= v <= 1, "expected a value in [0, 1]"),
        "learning_rate_decay_factor": (lambda v: 0 < v <= 1, "expected a value in (0, 1]"),
        "base_learning_rate": (lambda v: v > 0, "expected a positive number"),
        "momentum": (lambda v: 0 <= v < 1, "expected a value in [0, 1)"),
        "weight_decay": (lambda v: v >= 0, "expected 0 or more"),
        "epochs": (lambda v: v > 0, "expected a positive number"),
    }
    for name, (valid, expected) in intervals.items():
        value = getattr(recipe, name)
        if value is not None and not valid(value):
            raise InputError(f"{_flag(name)} {value}: {expected}.")
    if recipe.decay_epochs is not None:
        epochs = recipe.epochs if recipe.epochs is not None else SCHEDULES[recipe.schedule].epochs
        decays = recipe.decay_epochs
        if not all(0 < epoch <= epochs for epoch in decays) or any(b <= a for a, b in zip(decays, decays[1:])):
            raise InputError(
                f"--decay-epochs {' '.join(f'{epoch:g}' for epoch in decays)}: expected increasing epochs within "
                f"(0, {epochs:g}] (the run's {'--epochs' if recipe.epochs is not None else recipe.schedule + ' epochs'})."
            )


def make_recipe(arguments: PretrainingArguments) -> Recipe:
    """The paper's recipe for --schedule with every value given on the command line."""
    recipe = arguments.recipe
    values = {
        field.name: getattr(recipe, field.name)
        for field in dataclasses.fields(Recipe)
        if field.name != "schedule" and field.name != "image_size" and hasattr(recipe, field.name)
    }
    return recipe_for_schedule(recipe.schedule, image_size=arguments.model.image_size, **values)
