"""Pre-train a BiT network upstream with the paper's recipe, from one CPU to many GPUs or TPU cores.

    accelerate launch [--config_file pretraining/configs/multi_gpu.yaml] pretraining/pretrain.py \\
        --model-preset BiT-M-R101x3 --dataset NAME --streaming --output-dir O
    torchrun --nproc_per_node 2 pretraining/pretrain.py --model-preset bit-tiny --train-dir D --output-dir O
    python pretraining/pretrain.py --model-preset bit-tiny --train-dir D --output-dir O --max-steps 100

accelerate is the distributed engine (DDP, FSDP, DeepSpeed, TPU). The recipe (SGD with momentum, learning
rate scaled with the global batch, linear warmup, staircase decays, weight decay; the paper's values) comes
from `pretraining.recipe`; every value has a flag (defaults below), and the script prints what differs from
the paper. The global batch is per-device batch x processes x gradient accumulation; the accumulation is
derived, and a resume that would change any of them (or anything else that fixes the data order, schedule
or model) is refused, naming what changed.

Writes checkpoints (`O/checkpoints/step-N`, atomic, the newest --keep-checkpoints kept; resume with
`--resume-from-checkpoint latest|PATH` continues exactly), `O/training_log.jsonl`, `O/probe_results.json`
(few-shot ridge probe on held-out examples every --probe-every steps) and finally `O/final`: a
`save_pretrained` folder with the image processor, `bit_pretraining.json`, the logs and a model card.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

if __name__ == "__main__" and not __package__:
    # Run by path (`python pretraining/pretrain.py`, `torchrun ...`, `accelerate launch ...`): import this
    # checkout's packages, not whatever the script's own folder would shadow.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from accelerate import Accelerator, PartialState
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import gather_object, is_tensorboard_available, is_trackio_available, set_seed
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from model_cards import write_model_card
from modeling_bit import BitConfig, BitForImageClassification, bit_image_processor
from modeling_bit.configuration_bit import canonical_preset_name
from modeling_bit.file_utils import atomic_directory, atomic_write_json
from modeling_bit.modeling_bit import MIN_IMAGE_SIZE
from pretraining import data as upstream_data
from pretraining.errors import InputError
from pretraining.probe import few_shot_probe
from pretraining.recipe import (
    BASE_LEARNING_RATE,
    BASE_LEARNING_RATE_BATCH_SIZE,
    CROP_AREA_RANGE,
    CROP_ASPECT_RATIO_RANGE,
    DEFAULT_SCHEDULE,
    FEW_SHOT_EXAMPLES_PER_CLASS,
    GLOBAL_BATCH_SIZE,
    HORIZONTAL_FLIP_PROBABILITY,
    IMAGE_SIZE,
    LEARNING_RATE_DECAY_FACTOR,
    MOMENTUM,
    MULTI_LABEL_HEAD_BIAS,
    SCHEDULES,
    WARMUP_STEPS,
    WEIGHT_DECAY,
    LearningRateSchedule,
    Recipe,
    build_schedule,
    gradient_accumulation_steps,
    recipe_for_schedule,
)
from pretraining.training import (
    CHECKPOINTS_FOLDER,
    PROBE_RESULTS_FILE,
    TRAINING_LOG_FILE,
    append_training_log,
    checkpoint_folders,
    init_multi_label_head,
    read_progress,
    resolve_checkpoint,
    save_checkpoint,
    truncate_training_log,
    upstream_loss,
)

METADATA_FILE = "bit_pretraining.json"
PROJECT_NAME = "bit-pretraining"


def _show_range(values) -> str:
    return " ".join(f"{value:.3g}" for value in values)


def _describe_schedules() -> str:
    return "; ".join(
        f"{name} {schedule.epochs:g} epochs, decays after {'/'.join(f'{e:g}' for e in schedule.decay_epochs)}"
        for name, schedule in SCHEDULES.items()
    )


@dataclasses.dataclass
class ModelArguments:
    model_preset: str = dataclasses.field(
        metadata={"help": "BiT architecture: BiT-{S,M}-R{50x1,...,152x4}, bit-tiny, bit-small (case-insensitive)."}
    )
    image_size: int = dataclasses.field(
        default=IMAGE_SIZE, metadata={"help": f"Training resolution (paper: {IMAGE_SIZE})."}
    )
    multi_label: bool = dataclasses.field(
        default=False,
        metadata={"help": "Labels are lists of class ids: per-class sigmoid loss, head bias --multi-label-head-bias."},
    )
    mixed_precision: Literal["no", "bf16", "fp16"] | None = dataclasses.field(
        default=None, metadata={"help": "Autocast precision; default: the accelerate config's (else none)."}
    )
    gradient_checkpointing: bool = dataclasses.field(
        default=False, metadata={"help": "Recompute activations in backward: less memory, about a third more compute."}
    )
    channels_last: bool = dataclasses.field(default=False, metadata={"help": "NHWC memory layout (faster on GPUs)."})


@dataclasses.dataclass
class DataArguments:
    train_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Image folder, one subfolder per class."}
    )
    dataset: str | None = dataclasses.field(
        default=None,
        metadata={"help": "A datasets name: Hub id, local folder of parquet/webdataset shards, or builder."},
    )
    dataset_config: str | None = dataclasses.field(default=None, metadata={"help": "Configuration of --dataset."})
    data_files: list[str] | None = dataclasses.field(default=None, metadata={"help": "Files or globs for --dataset."})
    streaming: bool = dataclasses.field(
        default=False, metadata={"help": "Stream the data (sharded by process, shuffle buffer) instead of caching it."}
    )
    train_split: str = "train"
    validation_split: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Held-out split; default: 'validation'/'val' if present, else a slice of train."},
    )
    validation_examples: int = dataclasses.field(
        default=10000,
        metadata={"help": "Size of the held-out slice taken from train (at most a tenth of it; 0: none)."},
    )
    image_column: str | None = None
    label_column: str | None = None
    num_labels: int | None = dataclasses.field(default=None, metadata={"help": "Classes, if the data does not say."})
    num_train_examples: int | None = dataclasses.field(
        default=None, metadata={"help": "Size of a streamed training set (converts epochs into steps)."}
    )
    shuffle_buffer_size: int = dataclasses.field(
        default=10000,
        metadata={
            "help": "Streaming: each DataLoader worker shuffles its examples in windows of this many (the shard "
            "order is shuffled each epoch too); a resume re-reads at most one window."
        },
    )
    dataloader_num_workers: int = dataclasses.field(default=2, metadata={"help": "Decoding processes per process."})
    cache_dir: str | None = None


@dataclasses.dataclass
class PretrainingArguments:
    output_dir: str = dataclasses.field(metadata={"help": "Checkpoints, logs and the final model (O/final)."})
    max_steps: int | None = dataclasses.field(default=None, metadata={"help": "Train for this many optimizer steps."})
    epochs: float | None = dataclasses.field(
        default=None, metadata={"help": "Train for this many epochs (default: the --schedule's)."}
    )
    schedule: Literal["bit-s", "bit-m", "bit-l"] = dataclasses.field(
        default=DEFAULT_SCHEDULE, metadata={"help": "Paper schedule: " + _describe_schedules() + "."}
    )
    global_batch_size: int = dataclasses.field(
        default=GLOBAL_BATCH_SIZE,
        metadata={"help": f"Images per optimizer step over all processes (paper: {GLOBAL_BATCH_SIZE})."},
    )
    per_device_batch_size: int = 32
    base_learning_rate: float | None = dataclasses.field(
        default=None,
        metadata={"help": f"Learning rate at --base-learning-rate-batch-size (paper: {BASE_LEARNING_RATE:g})."},
    )
    base_learning_rate_batch_size: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": f"Batch size the base learning rate is given for; the peak scales with global batch / this "
            f"(paper: {BASE_LEARNING_RATE_BATCH_SIZE})."
        },
    )
    warmup_steps: int | None = dataclasses.field(
        default=None, metadata={"help": f"Linear warmup steps (paper: {WARMUP_STEPS})."}
    )
    decay_epochs: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "Epochs after which the learning rate decays (default: the --schedule's)."}
    )
    learning_rate_decay_factor: float | None = dataclasses.field(
        default=None, metadata={"help": f"Factor of each decay (paper: {LEARNING_RATE_DECAY_FACTOR:g})."}
    )
    weight_decay: float | None = dataclasses.field(default=None, metadata={"help": f"Paper: {WEIGHT_DECAY:g}."})
    momentum: float | None = dataclasses.field(default=None, metadata={"help": f"SGD momentum (paper: {MOMENTUM:g})."})
    crop_area_range: list[float] | None = dataclasses.field(
        default=None,
        metadata={"help": "Inception crop: area fraction LOW HIGH (paper: " + _show_range(CROP_AREA_RANGE) + ")."},
    )
    crop_aspect_ratio_range: list[float] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Inception crop: aspect ratio LOW HIGH (paper: " + _show_range(CROP_ASPECT_RATIO_RANGE) + ")."
        },
    )
    horizontal_flip_probability: float | None = dataclasses.field(
        default=None, metadata={"help": f"Paper: {HORIZONTAL_FLIP_PROBABILITY:g}."}
    )
    multi_label_head_bias: float | None = dataclasses.field(
        default=None, metadata={"help": f"Initial head bias with --multi-label (default: {MULTI_LABEL_HEAD_BIAS:g})."}
    )
    seed: int = 0
    checkpoint_every: int = dataclasses.field(default=1000, metadata={"help": "Save a checkpoint every K steps."})
    keep_checkpoints: int = dataclasses.field(default=3, metadata={"help": "Keep the newest N checkpoints."})
    resume_from_checkpoint: str | None = dataclasses.field(
        default=None, metadata={"help": "'latest' (newest in --output-dir, or start fresh) or a checkpoint folder."}
    )
    overwrite_output_dir: bool = dataclasses.field(
        default=False,
        metadata={"help": "Start afresh in an --output-dir that holds another run's checkpoints: delete them first."},
    )
    logging_steps: int = dataclasses.field(default=50, metadata={"help": "Log loss, lr and throughput every N steps."})
    probe_every: int = dataclasses.field(
        default=0, metadata={"help": "Few-shot probe every M steps (0: only at the end)."}
    )
    probe_examples_per_class: int = dataclasses.field(
        default=20, metadata={"help": "Held-out examples per probe class."}
    )
    probe_classes: int = dataclasses.field(default=100, metadata={"help": "Classes in the few-shot probe."})
    report_to: Literal["none", "tensorboard", "trackio", "all"] = dataclasses.field(
        default="none", metadata={"help": "Experiment tracker (if installed)."}
    )


def parse_arguments(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments), description=__doc__)
    return parser.parse_args_into_dataclasses(args=argv)


def validate_arguments(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> None:
    """Refuse bad combinations before any data is read or any process group is used."""
    if canonical_preset_name(model_args.model_preset) is None:
        raise InputError(
            f"Unknown --model-preset {model_args.model_preset!r}: expected one of {', '.join(BitConfig.preset_names())}."
        )
    if model_args.image_size < MIN_IMAGE_SIZE:
        raise InputError(f"--image-size {model_args.image_size}: BiT needs at least {MIN_IMAGE_SIZE} pixels.")
    if (data_args.train_dir is None) == (data_args.dataset is None):
        raise InputError("Give exactly one of --train-dir (an image folder) and --dataset (a datasets name or path).")
    if args.max_steps is not None and args.epochs is not None:
        raise InputError("Give --max-steps or --epochs, not both.")
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise InputError(
            "--overwrite-output-dir deletes the checkpoints a --resume-from-checkpoint would continue: give one."
        )
    for name in (
        "checkpoint_every",
        "keep_checkpoints",
        "logging_steps",
        "per_device_batch_size",
        "global_batch_size",
    ):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if data_args.shuffle_buffer_size < 1:
        raise InputError(f"--shuffle-buffer-size {data_args.shuffle_buffer_size}: expected at least 1.")
    if args.probe_every < 0 or data_args.validation_examples < 0 or data_args.dataloader_num_workers < 0:
        raise InputError("--probe-every, --validation-examples and --dataloader-num-workers cannot be negative.")
    if args.crop_area_range is not None and not (
        len(args.crop_area_range) == 2 and 0 < args.crop_area_range[0] <= args.crop_area_range[1] <= 1
    ):
        raise InputError(f"--crop-area-range {args.crop_area_range}: expected LOW HIGH with 0 < LOW <= HIGH <= 1.")
    if args.crop_aspect_ratio_range is not None and not (
        len(args.crop_aspect_ratio_range) == 2
        and 0 < args.crop_aspect_ratio_range[0] <= args.crop_aspect_ratio_range[1]
    ):
        raise InputError(
            f"--crop-aspect-ratio-range {args.crop_aspect_ratio_range}: expected LOW HIGH with 0 < LOW <= HIGH."
        )
    if args.horizontal_flip_probability is not None and not 0 <= args.horizontal_flip_probability <= 1:
        raise InputError(
            f"--horizontal-flip-probability {args.horizontal_flip_probability}: expected a value in [0, 1]."
        )
    if args.learning_rate_decay_factor is not None and not 0 < args.learning_rate_decay_factor <= 1:
        raise InputError(
            f"--learning-rate-decay-factor {args.learning_rate_decay_factor}: expected a value in (0, 1]."
        )
    if args.base_learning_rate_batch_size is not None and args.base_learning_rate_batch_size < 1:
        raise InputError(f"--base-learning-rate-batch-size {args.base_learning_rate_batch_size}: expected at least 1.")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise InputError(f"--warmup-steps {args.warmup_steps}: expected 0 or more.")
    for name in ("base_learning_rate", "weight_decay", "momentum", "multi_label_head_bias", "epochs"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{name.replace('_', '-')} {value}: expected a finite number.")
    if args.base_learning_rate is not None and args.base_learning_rate <= 0:
        raise InputError(f"--base-learning-rate {args.base_learning_rate}: expected a positive number.")
    if args.momentum is not None and not 0 <= args.momentum < 1:
        raise InputError(f"--momentum {args.momentum}: expected a value in [0, 1).")
    if args.weight_decay is not None and args.weight_decay < 0:
        raise InputError(f"--weight-decay {args.weight_decay}: expected 0 or more.")
    if args.epochs is not None and args.epochs <= 0:
        raise InputError(f"--epochs {args.epochs}: expected a positive number.")
    if args.decay_epochs is not None:
        epochs = args.epochs if args.epochs is not None else SCHEDULES[args.schedule].epochs
        decays = args.decay_epochs
        if not all(0 < epoch <= epochs for epoch in decays) or any(b <= a for a, b in zip(decays, decays[1:])):
            raise InputError(
                f"--decay-epochs {' '.join(f'{epoch:g}' for epoch in decays)}: expected increasing epochs within "
                f"(0, {epochs:g}] (the run's {'--epochs' if args.epochs is not None else args.schedule + ' epochs'})."
            )
    for name in ("max_steps", "num_train_examples", "probe_examples_per_class", "probe_classes"):
        arguments = data_args if name == "num_train_examples" else args
        value = getattr(arguments, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} {value}: expected at least 1.")
    if args.report_to in ("tensorboard", "all") and not is_tensorboard_available():
        raise InputError("--report-to tensorboard needs tensorboard: pip install tensorboard.")
    if args.report_to in ("trackio", "all") and not is_trackio_available():
        raise InputError("--report-to trackio needs trackio: pip install trackio.")


def checkpoints_of_another_run(output_dir: Path, args: PretrainingArguments) -> list[Path]:
    """The checkpoints a fresh run would have to delete (--overwrite-output-dir); refuse to mix runs otherwise.

    A save never replaces a checkpoint folder, so a new run among another run's checkpoints would keep theirs
    and lose its own work.
    """
    if args.resume_from_checkpoint == "latest":
        return []
    existing = checkpoint_folders(output_dir)
    if args.resume_from_checkpoint is not None:
        resumed = Path(args.resume_from_checkpoint).resolve()
        if any(resumed == folder.resolve() for folder in existing):
            return []  # continuing this folder's own run from an earlier checkpoint
    if existing and not args.overwrite_output_dir:
        raise InputError(
            f"--output-dir {output_dir} already holds {len(existing)} checkpoint(s) of another run (newest "
            f"{existing[-1].name}). Continue that run with --resume-from-checkpoint latest, choose another "
            "--output-dir, or pass --overwrite-output-dir to delete them."
        )
    return existing


def make_recipe(model_args: ModelArguments, args: PretrainingArguments) -> Recipe:
    return recipe_for_schedule(
        args.schedule,
        global_batch_size=args.global_batch_size,
        base_learning_rate=args.base_learning_rate,
        warmup_steps=args.warmup_steps,
        epochs=args.epochs,
        decay_epochs=args.decay_epochs,
        base_learning_rate_batch_size=args.base_learning_rate_batch_size,
        learning_rate_decay_factor=args.learning_rate_decay_factor,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        image_size=model_args.image_size,
        crop_area_range=args.crop_area_range,
        crop_aspect_ratio_range=args.crop_aspect_ratio_range,
        horizontal_flip_probability=args.horizontal_flip_probability,
        multi_label_head_bias=args.multi_label_head_bias,
    )


def build_model(
    model_args: ModelArguments, labels: upstream_data.LabelSpace, recipe: Recipe
) -> BitForImageClassification:
    config = BitConfig.from_preset(
        model_args.model_preset,
        id2label=dict(enumerate(labels.names)),
        label2id={name: index for index, name in enumerate(labels.names)},
        problem_type="multi_label_classification" if labels.multi_label else "single_label_classification",
    )
    model = BitForImageClassification(config)
    if labels.multi_label:
        init_multi_label_head(model, recipe.multi_label_head_bias)
    if model_args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if model_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_train_loader(
    source: upstream_data.UpstreamData,
    builder,
    accelerator: Accelerator,
    args: PretrainingArguments,
    data_args: DataArguments,
    accumulation: int,
    start_step: int,
    total_steps: int,
    stream_positions: dict[int, dict],
):
    """This process's micro-batches from `start_step` on (a stream's workers restart at `stream_positions`).

    Sharding is ours (the data position is a function of the step); accelerate only moves batches to the
    device (and wraps the loader for TPU). The loader's own generator seeds its workers, so creating it does
    not consume the global RNG that checkpoints restore.
    """
    if source.streaming:
        stream = upstream_data.shard_stream(
            source.train, args.seed, accelerator.process_index, accelerator.num_processes
        )
        examples = upstream_data.ResumableStream(
            stream,
            args.per_device_batch_size,
            start_step * accumulation,
            total_steps * accumulation,
            accelerator.process_index,
            args.seed,
            data_args.shuffle_buffer_size,
            stream_positions,
        )
        loader = torch.utils.data.DataLoader(
            examples,
            batch_size=args.per_device_batch_size,
            num_workers=upstream_data.max_stream_workers(stream, data_args.dataloader_num_workers),
            collate_fn=upstream_data.StreamBatchBuilder(builder),
            generator=torch.Generator().manual_seed(args.seed),
        )
    else:
        sampler = upstream_data.StepBatchSampler(
            args.per_device_batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            accumulation,
            start_step,
            total_steps,
        )
        loader = torch.utils.data.DataLoader(
            upstream_data.EpochStream(source.train, args.seed),
            batch_sampler=sampler,
            num_workers=data_args.dataloader_num_workers,
            collate_fn=builder,
            generator=torch.Generator().manual_seed(args.seed),
        )
    return prepare_data_loader(
        loader, device=accelerator.device, num_processes=1, process_index=0, put_on_device=True, dispatch_batches=False
    )


class HeldOutSet:
    """Decoded held-out examples for the few-shot probe and the held-out loss, split across processes.

    Taken from the validation data: the `classes` best-populated classes (ties: lowest id), up to `per_class`
    examples each; for multi-label data, the examples with exactly one label.
    """

    def __init__(
        self,
        source: upstream_data.UpstreamData,
        builder,
        accelerator: Accelerator,
        per_class: int,
        classes: int,
        batch_size: int,
        scan_limit: int,
    ):
        self.accelerator = accelerator
        items = choose_held_out(source, per_class, classes, scan_limit)
        self.size = len(items)
        # Every process gets the same number of rows (padding rows have weight 0), so results can be gathered.
        rows = math.ceil(self.size / accelerator.num_processes)
        mine = items[accelerator.process_index :: accelerator.num_processes]
        mine = [(item, False) for item in mine] + [(items[0], True)] * (rows - len(mine)) if items else []
        self.pixels, self.labels, self.weights = [], [], []
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            batch = builder([item for item, _ in chunk])
            padding = torch.tensor([is_padding for _, is_padding in chunk])
            # Resized pixels are k / 127.5 - 1 for 8-bit k: stored as uint8, exactly, in a quarter of the memory.
            self.pixels.append(((batch["pixel_values"] + 1) * 127.5).round().to(torch.uint8))
            self.labels.append(batch["labels"])
            self.weights.append(batch["weights"].masked_fill(padding, 0.0))

    @torch.no_grad()
    def evaluate(self, model, multi_label: bool) -> dict | None:
        """Held-out loss and top-1, and the pre-logits (classifier inputs) of every example, on every process."""
        if self.size == 0:
            return None
        captured = []
        head = self.accelerator.unwrap_model(model).classifier
        hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].flatten(1).float()))
        was_training = model.training
        model.eval()
        logits = []
        try:
            for pixels in self.pixels:
                pixel_values = pixels.to(self.accelerator.device).float() / 127.5 - 1
                logits.append(model(pixel_values=pixel_values).logits.float())
        finally:
            hook.remove()
            model.train(was_training)
        device = self.accelerator.device
        local = (
            torch.cat(logits),
            torch.cat(self.labels).to(device),
            torch.cat(self.weights).to(device),
            torch.cat(captured),
        )
        logits, labels, weights, features = (self.accelerator.gather(tensor).cpu() for tensor in local)
        keep = weights > 0
        logits, labels, features = logits[keep], labels[keep], features[keep]
        loss = upstream_loss(logits, labels, torch.ones(len(logits)), multi_label).item()
        single = labels.argmax(dim=1) if multi_label else labels
        return {
            "loss": loss,
            "accuracy": float((logits.argmax(dim=1) == single).float().mean()),
            "features": features.numpy(),
            "labels": single.numpy(),
        }


def choose_held_out(source: upstream_data.UpstreamData, per_class: int, classes: int, scan_limit: int) -> list:
    """(example, key) items of the held-out set, from at most `scan_limit` examples of a streamed split."""
    if source.validation is None:
        return []
    if source.streaming:
        examples = list(source.validation.take(scan_limit))
        labels = [example[source.label_column] for example in examples]
    else:
        examples, labels = None, source.validation[source.label_column]
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        if source.labels.multi_label:
            if len(label) != 1:
                continue
            label = label[0]
        by_class.setdefault(int(label), []).append(index)
    ranked = sorted(by_class, key=lambda c: (-len(by_class[c]), c))[:classes]
    chosen = [index for c in sorted(ranked) for index in by_class[c][:per_class]]
    if examples is None:
        return [(example, (index,)) for index, example in zip(chosen, source.validation.select(chosen))]
    return [(examples[index], (index,)) for index in chosen]


class Throughput:
    """Images per second and seconds per optimizer step since the previous report."""

    def __init__(self):
        self.since, self.images, self.steps = time.perf_counter(), 0, 0

    def add_step(self, images: int) -> None:
        self.images += images
        self.steps += 1

    def report(self) -> tuple[float, float]:
        """(images per second, seconds per step) over the steps since the previous report."""
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        rates = self.images / elapsed, elapsed / max(self.steps, 1)
        self.since, self.images, self.steps = now, 0, 0
        return rates


@dataclasses.dataclass
class PretrainingResult:
    final: Path  # O/final
    model: torch.nn.Module  # as prepared by accelerate (DDP/FSDP wrapped); `accelerator.unwrap_model` it
    accelerator: Accelerator


def train(argv: list[str] | None = None, on_batch=None) -> PretrainingResult:
    """Run a pre-training job from command-line arguments.

    `on_batch(step, batch)`, if given, sees every micro-batch of this process before it is trained on (for
    inspecting the data stream; the script itself passes nothing). The caller ends the run with
    `result.accelerator.end_training()` (trackers, process group), as `main` does.
    """
    model_args, data_args, args = parse_arguments(argv)
    validate_arguments(model_args, data_args, args)
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(
            f"--output-dir {output_dir}: cannot create it ({error}); expected a writable folder."
        ) from error
    foreign_checkpoints = checkpoints_of_another_run(output_dir, args)
    recipe = make_recipe(model_args, args)

    # accelerate treats a torchrun launch on CPU-only machines as multi-CPU (gloo) only when told to use the CPU.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    state = PartialState(cpu=cpu)
    accumulation = gradient_accumulation_steps(
        recipe.global_batch_size, args.per_device_batch_size, state.num_processes
    )
    trackers = {"none": None, "all": ["tensorboard", "trackio"]}.get(args.report_to, [args.report_to])
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=model_args.mixed_precision,
        gradient_accumulation_steps=accumulation,
        log_with=trackers,
        project_dir=str(output_dir),
    )
    set_seed(args.seed)
    if foreign_checkpoints and accelerator.is_main_process:
        shutil.rmtree(output_dir / CHECKPOINTS_FOLDER)
        accelerator.print(
            f"--overwrite-output-dir: deleted {len(foreign_checkpoints)} checkpoint(s) of an earlier run."
        )
    accelerator.wait_for_everyone()

    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    with accelerator.main_process_first():
        source = upstream_data.load_upstream_data(
            train_dir=data_args.train_dir,
            dataset=data_args.dataset,
            dataset_config=data_args.dataset_config,
            data_files=data_args.data_files,
            streaming=data_args.streaming,
            train_split=data_args.train_split,
            validation_split=data_args.validation_split,
            validation_examples=data_args.validation_examples,
            image_column=data_args.image_column,
            label_column=data_args.label_column,
            multi_label=model_args.multi_label,
            num_labels=data_args.num_labels,
            num_train_examples=data_args.num_train_examples,
            seed=args.seed,
            cache_dir=data_args.cache_dir,
        )
    schedule = build_schedule(recipe, source.num_train_examples, args.max_steps)
    announce_run(accelerator, model_args, recipe, schedule, source, args, accumulation)
    differences = differences_from_paper(recipe, schedule, args)
    signature = run_signature(
        model_args, data_args, args, recipe, schedule, source, accelerator.num_processes, accumulation
    )
    progress = read_progress(checkpoint) if checkpoint is not None else None
    if progress is not None:
        check_resumable(progress, signature, checkpoint)

    model = build_model(model_args, source.labels, recipe)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=schedule.learning_rate(0), momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if trackers:
        accelerator.init_trackers(PROJECT_NAME, config={**recipe.to_dict(), "total_steps": schedule.total_steps})

    start_step, unreadable = 0, UnreadableImages()
    stream_positions: dict[int, dict] = {}  # DataLoader worker -> position of its last example trained on
    if checkpoint is not None:
        try:
            accelerator.load_state(str(checkpoint))
        except FileNotFoundError as error:
            raise InputError(
                f"{checkpoint} is incomplete ({error}): expected the model, optimizer and RNG files "
                "accelerator.save_state writes. Resume from an earlier checkpoint or delete this one."
            ) from error
        start_step = progress["step"]
        if source.streaming:
            saved = progress["stream_positions"][accelerator.process_index]
            stream_positions = {int(worker): position for worker, position in saved.items()}
        unreadable.restore(progress["unreadable_images"], accelerator)
        accelerator.print(f"Resumed from {checkpoint} at step {start_step}.")
    elif args.resume_from_checkpoint == "latest":
        accelerator.print(f"No checkpoint in {output_dir} yet: starting from step 0.")

    train_builder = upstream_data.BatchBuilder(
        source.image_column,
        source.label_column,
        source.labels,
        recipe.image_size,
        args.seed,
        train=True,
        crop_area_range=recipe.crop_area_range,
        crop_aspect_ratio_range=recipe.crop_aspect_ratio_range,
        flip_probability=recipe.horizontal_flip_probability,
    )
    eval_builder = upstream_data.BatchBuilder(
        source.image_column, source.label_column, source.labels, recipe.image_size, args.seed, train=False
    )
    held_out = HeldOutSet(
        source,
        eval_builder,
        accelerator,
        args.probe_examples_per_class,
        args.probe_classes,
        args.per_device_batch_size,
        scan_limit=max(data_args.validation_examples, 1),
    )
    loader = build_train_loader(
        source,
        train_builder,
        accelerator,
        args,
        data_args,
        accumulation,
        start_step,
        schedule.total_steps,
        stream_positions,
    )

    log_path, probe_path = output_dir / TRAINING_LOG_FILE, output_dir / PROBE_RESULTS_FILE
    probe_results, last_loss = [], float("nan")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        logged_losses = [entry["loss"] for entry in truncate_training_log(log_path, start_step) if "loss" in entry]
        last_loss = logged_losses[-1] if logged_losses else last_loss
        if probe_path.exists():
            probe_results = [r for r in json.loads(probe_path.read_text()) if r["step"] <= start_step]

    def progress_state(step: int) -> dict:
        progress = {"step": step, **signature, "unreadable_images": unreadable.gathered(accelerator)}
        if source.streaming:
            progress["stream_positions"] = gather_object([stream_positions])
        return progress

    def run_probe(step: int) -> dict:
        result = held_out.evaluate(model, source.labels.multi_label)
        if result is None:
            return {}
        metrics = {"heldout_loss": result["loss"], "heldout_accuracy": result["accuracy"]}
        if accelerator.is_main_process:
            for entry in few_shot_probe(
                result["features"], result["labels"], FEW_SHOT_EXAMPLES_PER_CLASS, seed=args.seed
            ):
                probe_results.append({"step": step, **entry})
                metrics[f"probe_{entry['examples_per_class']}shot_accuracy"] = entry["accuracy"]
                metrics["probe_classes"] = entry["num_classes"]  # the same for every k
            atomic_write_json(probe_path, probe_results)
        return metrics

    model.train()
    progress_bar = tqdm(
        total=schedule.total_steps,
        initial=start_step,
        desc="pretraining",
        unit="step",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    throughput = Throughput()
    loss_sum = torch.zeros((), device=accelerator.device)
    steps_since_log = 0
    batches = iter(loader)
    for step in range(start_step, schedule.total_steps):
        learning_rate = schedule.learning_rate(step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        readable = 0
        for _ in range(accumulation):
            batch = next(batches)
            if source.streaming:
                position = batch.pop("stream_position")
                stream_positions[position["worker"]] = position
            if on_batch is not None:
                on_batch(step, batch)
            unreadable.add(batch["unreadable"])
            readable += len(batch["weights"]) - len(batch["unreadable"])
            pixel_values = batch["pixel_values"]
            if model_args.channels_last:
                pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                logits = model(pixel_values=pixel_values).logits
                loss = upstream_loss(logits, batch["labels"], batch["weights"], source.labels.multi_label)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() / accumulation
        refuse_unreadable_step(accelerator, readable, step, unreadable)
        throughput.add_step(recipe.global_batch_size)
        steps_since_log += 1
        done = step + 1
        progress_bar.update(1)

        metrics = {}
        probe_now = (args.probe_every and done % args.probe_every == 0) or done == schedule.total_steps
        if done % args.logging_steps == 0 or probe_now:
            last_loss = accelerator.reduce(loss_sum, reduction="mean").item() / steps_since_log
            images_per_second, seconds_per_step = throughput.report()
            metrics = {
                "step": done,
                "loss": last_loss,
                "learning_rate": learning_rate,
                "images_per_second": images_per_second,
                "images_per_second_per_device": images_per_second / accelerator.num_processes,
                # From the steps since the previous log entry (probes and checkpoints included), not the whole run.
                "eta_seconds": (schedule.total_steps - done) * seconds_per_step,
                "epoch": done * recipe.global_batch_size / source.num_train_examples
                if source.num_train_examples
                else None,
                "unreadable_images": unreadable.total(accelerator),
            }
            loss_sum.zero_()
            steps_since_log = 0
        if probe_now:
            metrics.update(run_probe(done))
        if metrics:
            if accelerator.is_main_process:
                append_training_log(log_path, metrics)
                progress_bar.set_postfix(_postfix(metrics, learning_rate), refresh=False)
            if trackers:
                accelerator.log({k: v for k, v in metrics.items() if k != "step" and v is not None}, step=done)
        if done % args.checkpoint_every == 0 or done == schedule.total_steps:
            save_checkpoint(accelerator, output_dir, done, progress_state(done), args.keep_checkpoints)
    progress_bar.close()

    # Called from Python with `argv`, the process's own sys.argv is the caller's (e.g. pytest's), not this job's.
    command = list(sys.argv) if argv is None else ["pretraining/pretrain.py", *argv]
    final = save_final(
        accelerator,
        model,
        output_dir,
        recipe,
        schedule,
        source,
        last_loss,
        unreadable.gathered(accelerator),
        probe_results,
        differences,
        command,
    )
    return PretrainingResult(final, model, accelerator)


def main(argv: list[str] | None = None) -> Path:
    try:
        result = train(argv)
    except InputError as error:
        # Bad input is explained in the message; a traceback would only bury it.
        raise SystemExit(f"pretrain: error: {input_error_message(error)}") from None
    result.accelerator.end_training()  # finish the trackers, then leave the process group cleanly
    return result.final


def refuse_unreadable_step(accelerator: Accelerator, readable: int, step: int, unreadable: UnreadableImages) -> None:
    """Stop when no image of a whole optimizer step could be read: the data (or --image-column) is wrong."""
    if accelerator.num_processes > 1:
        readable = int(accelerator.reduce(torch.tensor(readable, device=accelerator.device), reduction="sum").item())
    if readable == 0:
        examples = f" (e.g. {', '.join(unreadable.names[:3])})" if unreadable.names else ""
        raise InputError(
            f"None of the images of step {step + 1} could be read{examples}: expected image files or encoded images "
            "in the image column. Check --image-column and the data."
        )


def input_error_message(error: InputError) -> str:
    """The message of an InputError, also when a DataLoader worker raised it.

    torch re-raises a worker's exception as the same type with the worker's traceback as its message; the
    original message is that traceback's last line, after the exception's name.
    """
    message = str(error)
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(f"{InputError.__name__}: ", 1)[-1]


class UnreadableImages:
    """This process's count of skipped images, and the first few names (the count is exact)."""

    def __init__(self):
        self.count, self.names = 0, []

    def add(self, names: list[str]) -> None:
        self.count += len(names)
        room = upstream_data.UNREADABLE_NAMES_KEPT - len(self.names)
        self.names.extend(names[: max(room, 0)])

    def total(self, accelerator: Accelerator) -> int:
        count = torch.tensor(self.count, device=accelerator.device)
        return int(accelerator.reduce(count, reduction="sum").item())

    def gathered(self, accelerator: Accelerator) -> dict:
        """Every process's count and the run's first names (all processes must call this)."""
        per_process = gather_object([(self.count, self.names)])
        names = [name for _, names in per_process for name in names][: upstream_data.UNREADABLE_NAMES_KEPT]
        return {"count": sum(c for c, _ in per_process), "per_process": [c for c, _ in per_process], "names": names}

    def restore(self, saved: dict, accelerator: Accelerator) -> None:
        same_layout = len(saved["per_process"]) == accelerator.num_processes
        if same_layout:
            self.count = saved["per_process"][accelerator.process_index]
        else:  # a different number of processes: the main process carries the earlier total
            self.count = saved["count"] if accelerator.is_main_process else 0
        self.names = list(saved["names"]) if accelerator.is_main_process else []


def _postfix(metrics: dict, learning_rate: float) -> dict:
    postfix = {"lr": f"{learning_rate:.3g}"}
    if "loss" in metrics:
        postfix["loss"] = f"{metrics['loss']:.4f}"
        postfix["img/s/dev"] = f"{metrics['images_per_second_per_device']:.0f}"
        postfix["img/s"] = f"{metrics['images_per_second']:.0f}"
        postfix["eta"] = str(datetime.timedelta(seconds=round(metrics["eta_seconds"])))
    return postfix


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


def run_signature(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: PretrainingArguments,
    recipe: Recipe,
    schedule: LearningRateSchedule,
    source,
    num_processes: int,
    accumulation: int,
) -> dict:
    """The values of `RESUME_KEYS` for this run: a checkpoint continues exactly only under the same values.

    Map-style data is read by position (the examples of a step do not depend on the number of workers), so
    the worker count and shuffle buffer only matter for a stream, where workers own shards.
    """
    signature = {
        "model_preset": canonical_preset_name(model_args.model_preset),
        "dataset": source.description,
        "data_files": data_args.data_files,
        "image_column": source.image_column,
        "label_column": source.label_column,
        "streaming": source.streaming,
        "validation_split": data_args.validation_split,
        "validation_examples": data_args.validation_examples,
        "seed": args.seed,
        "total_steps": schedule.total_steps,
        "decay_steps": list(schedule.decay_steps),
        "global_batch_size": recipe.global_batch_size,
        "per_device_batch_size": args.per_device_batch_size,
        "num_processes": num_processes,
        "gradient_accumulation_steps": accumulation,
        "recipe": recipe.to_dict(),
    }
    if source.streaming:
        signature["shuffle_buffer_size"] = data_args.shuffle_buffer_size
        signature["dataloader_num_workers"] = data_args.dataloader_num_workers
    # The JSON round trip of progress.json turns tuples into lists: compare like with like.
    return json.loads(json.dumps(signature))


def check_resumable(progress: dict, signature: dict, checkpoint: Path) -> None:
    """Refuse a resume that would not continue exactly, naming each changed value and the checkpoint's."""
    changed = []
    for key, value in signature.items():
        saved = progress.get(key, "(not recorded)")
        if key == "recipe" and isinstance(saved, dict):
            changed.extend(
                f"recipe {name} is {value[name]!r} now, the checkpoint used {saved.get(name)!r}"
                for name in value
                if saved.get(name) != value[name]
            )
        elif saved != value:
            changed.append(f"{key} ({RESUME_KEYS[key]}) is {value!r} now, the checkpoint used {saved!r}")
    if changed:
        raise InputError(
            f"Cannot continue {checkpoint} exactly: " + "; ".join(changed) + ". Resume with the interrupted run's "
            "arguments and launcher, or start a new --output-dir."
        )


def differences_from_paper(recipe: Recipe, schedule: LearningRateSchedule, args) -> list[str]:
    """What this run changes in the paper's recipe, one line each."""
    differences = recipe.differences_from_paper()
    if args.max_steps is not None:
        decays = "/".join(f"{epoch:g}" for epoch in recipe.decay_epochs)
        differences.append(
            f"length: {schedule.total_steps} steps from --max-steps (paper: {recipe.epochs:g} epochs); the decays after "
            f"epochs {decays} of {recipe.epochs:g} fall at the same fractions of the steps: "
            f"{'/'.join(str(step) for step in schedule.decay_steps)}"
        )
    return differences


def announce_run(
    accelerator, model_args, recipe: Recipe, schedule: LearningRateSchedule, source, args, accumulation
) -> None:
    differences = differences_from_paper(recipe, schedule, args)
    lines = [
        f"BiT upstream pre-training: {model_args.model_preset} at {recipe.image_size} px, {source.labels.num_classes} classes"
        f" ({'multi-label, sigmoid loss' if source.labels.multi_label else 'softmax cross-entropy'}), "
        f"{source.num_train_examples if source.num_train_examples is not None else 'streamed'} training examples.",
        f"Global batch {recipe.global_batch_size} = {args.per_device_batch_size} per device x {accelerator.num_processes} "
        f"process(es) x {accumulation} accumulation step(s); peak lr {recipe.peak_learning_rate:g}; "
        f"{schedule.total_steps} steps, warmup {schedule.warmup_steps}, decays at steps {list(schedule.decay_steps)}.",
    ]
    if differences:
        lines.append(
            f"Differs from the paper's {recipe.schedule} recipe ({SCHEDULES[recipe.schedule].epochs:g} epochs):"
        )
        lines.extend(f"  - {line}" for line in differences)
    else:
        lines.append(f"The paper's {recipe.schedule} recipe, unmodified.")
    accelerator.print("\n".join(lines))


def save_final(
    accelerator,
    model,
    output_dir: Path,
    recipe: Recipe,
    schedule: LearningRateSchedule,
    source,
    final_loss: float,
    unreadable: dict,
    probe_results: list,
    differences: list[str],
    command: list[str],
) -> Path:
    """`O/final`: save_pretrained folder + image processor + metadata + logs + the model card, atomically."""
    state_dict = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers shards)
    final = output_dir / "final"
    if accelerator.is_main_process:
        with atomic_directory(final) as staging:
            unwrapped = accelerator.unwrap_model(model)
            contiguous = {name: tensor.contiguous() for name, tensor in state_dict.items()}
            unwrapped.save_pretrained(staging, state_dict=contiguous)
            bit_image_processor(recipe.image_size).save_pretrained(staging)
            atomic_write_json(
                staging / METADATA_FILE,
                {
                    "command": command,
                    "recipe": {
                        **recipe.to_dict(),
                        "total_steps": schedule.total_steps,
                        "decay_steps": list(schedule.decay_steps),
                    },
                    "differences_from_paper": differences,
                    "dataset": source.description,
                    "steps": schedule.total_steps,
                    "global_batch_size": recipe.global_batch_size,
                    "final_loss": final_loss,
                    "num_processes": accelerator.num_processes,
                    "unreadable_images": unreadable["count"],
                    "unreadable_image_names": unreadable["names"],
                    "bit_transfer_version": _version(),
                },
            )
            log = output_dir / TRAINING_LOG_FILE
            (staging / TRAINING_LOG_FILE).write_text(log.read_text() if log.exists() else "")
            atomic_write_json(staging / PROBE_RESULTS_FILE, probe_results)
            write_model_card(staging, folder_name=final.name)  # the folder appears with its card
        accelerator.print(f"Saved the pre-trained model to {final}")
    accelerator.wait_for_everyone()
    return final


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bit-transfer")
    except PackageNotFoundError:
        return "0+unknown"


if __name__ == "__main__":
    main()
