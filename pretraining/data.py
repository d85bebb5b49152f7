"""Upstream data with `datasets`: image folders, sharded parquet/webdataset files (local or Hub), streaming.

The data position of a run is a pure function of its optimizer step, which is what makes resuming exact:

- Map-style data (image folders, non-streaming datasets) is read as one endless stream of positions;
  epoch `e` visits the examples in a permutation seeded by (seed, e). The examples of optimizer step `s`
  are positions `s * G ... (s + 1) * G - 1` (G = global batch); process `r` takes micro-batch `a` at
  `s * G + a * b * P + r * b` (b = per-device batch, P = processes). So processes see disjoint examples,
  and 2 processes x b see the same examples in a step as 1 process x 2b.
- Streaming data is split between processes with `datasets.distributed.split_dataset_by_node` after a
  seeded shuffle of the shard order (re-drawn each epoch), and its shards are split between DataLoader
  workers by `datasets`. Each worker shuffles its examples in windows (`ResumableStream`). The torch
  DataLoader takes batches from its workers in turn, so after `n` micro-batches worker `w` has produced
  ceil((n - w) / W) of them. A checkpoint records, per worker, the `datasets` state_dict at the start of the
  window of the last example trained on; a resume loads it and re-reads (undecoded) at most one window.

Loading, split and column detection, the reading of image cells, the epoch order and the stream's shards per
process are the shared data layer's (`image_data`); what is pre-training's own is here: the label space (single-
or multi-label), the hold-out, the inception crop, multi-label batches and the step-addressed samplers.

Decoding and augmentation run in the DataLoader workers (`BatchBuilder` is the collate function). The
random crop and flip of an example are drawn from a generator seeded by (seed, the example's position), so
they do not depend on the number of processes or workers, nor on where a run was resumed. Unreadable images
follow `image_data.unreadable`: a blank stands in with weight 0 in the loss (batch shapes stay fixed), and
the batch names it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import signal
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate.data_loader import prepare_data_loader
from PIL import Image

import image_data
from image_data import EpochOrder, InputError, UnreadableImage, image_fingerprint, read_image
from modeling_bit import bit_image_processor

from .recipe import CROP_AREA_RANGE, CROP_ASPECT_RATIO_RANGE, CROP_ATTEMPTS, HORIZONTAL_FLIP_PROBABILITY


@dataclasses.dataclass
class LabelSpace:
    num_classes: int
    names: list[str]
    multi_label: bool


@dataclasses.dataclass
class UpstreamData:
    """The training stream and held-out examples of one run, with what the run needs to know about them."""

    train: datasets.Dataset | datasets.IterableDataset
    validation: datasets.Dataset | datasets.IterableDataset | None
    image_column: str
    label_column: str
    labels: LabelSpace
    num_train_examples: int | None  # None for a stream of unknown length
    description: dict  # for bit_pretraining.json: "name" or "train_dir", ...

    @property
    def streaming(self) -> bool:
        return isinstance(self.train, datasets.IterableDataset)


def load_upstream_data(
    *,
    train_dir: str | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    data_files: list[str] | None = None,
    streaming: bool = False,
    train_split: str = "train",
    validation_split: str | None = None,
    validation_examples: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    multi_label: bool = False,
    num_labels: int | None = None,
    num_train_examples: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> UpstreamData:
    """Load the training data and hold out a validation slice; raise a clear error on unusable input."""
    if (train_dir is None) == (dataset is None):
        raise InputError("Give exactly one of --train-dir (an image folder) and --dataset (a dataset name or path).")
    if train_dir is not None:
        source = image_data.load_image_folder(train_dir, streaming=streaming, cache_dir=cache_dir)
        description = {"train_dir": str(Path(train_dir).resolve())}
    else:
        source = image_data.load_image_dataset(
            dataset, dataset_config, data_files=data_files, streaming=streaming, cache_dir=cache_dir
        )
        description = {"name": dataset, **({"config": dataset_config} if dataset_config else {})}

    train = source.split(train_split)
    validation_split = source.validation_split_name(validation_split, train_split)
    validation = source.splits[validation_split] if validation_split else None

    where = f"{source.given} split {train_split!r}"
    features = image_data.declared_features(train, where)
    image_column = image_data.find_image_column(features, image_column, where)
    label_column = image_data.find_label_column(features, label_column, where)
    _check_label_type(features, label_column, where)
    is_list = isinstance(features[label_column], image_data.sources.LIST_FEATURES)
    if multi_label and not is_list:
        raise InputError(
            f"--multi-label needs a label column holding lists of class ids; {label_column!r} holds single labels "
            f"({features[label_column]})."
        )
    if is_list and not multi_label:
        raise InputError(
            f"The label column {label_column!r} holds lists of labels: pass --multi-label to train with the "
            "per-class sigmoid loss."
        )
    if isinstance(features[image_column], datasets.Image):
        # Decoding happens in the DataLoader workers (`BatchBuilder`), where unreadable files are skipped and named.
        train = image_data.undecoded(train, image_column)
        if validation is not None:
            validation = image_data.undecoded(validation, image_column)

    if streaming:
        if validation is None and validation_examples > 0:
            validation = train.take(validation_examples)
            # Not `train.skip(n)`: once the stream is split between processes and workers, datasets spreads the
            # skip over the shards, which would leave held-out examples in training and drop others.
            without_held_out = WithoutExamples(image_column, validation)
            if without_held_out.count < validation_examples:  # the stream ended inside the hold-out
                raise InputError(
                    f"--validation-examples {validation_examples} held out the whole stream (it has "
                    f"{without_held_out.count} examples): none is left to train on. Lower --validation-examples, or "
                    "give a --validation-split."
                )
            train = train.filter(without_held_out)
        size = num_train_examples
    else:
        if len(train) == 0:
            raise InputError(f"The training data is empty ({description}).")
        if validation is None and validation_examples > 0:
            held_out = min(validation_examples, len(train) // 10)
            if held_out > 0:
                parts = train.train_test_split(test_size=held_out, seed=seed, shuffle=True)
                train, validation = parts["train"], parts["test"]
        size = len(train)
    labels = _label_space(train, label_column, multi_label, num_labels)
    for split, name in ((train, train_split), (validation, validation_split or "held-out")):
        if isinstance(split, datasets.Dataset):
            _check_label_range(split, label_column, labels.num_classes, name)
    description.update({"num_examples": size, "num_classes": labels.num_classes, "multi_label": labels.multi_label})
    return UpstreamData(train, validation, image_column, label_column, labels, size, description)


def load_for_run(data_args, multi_label: bool, seed: int) -> UpstreamData:
    """`load_upstream_data` with the values of `pretrain.py`'s data flags (`arguments.DataArguments`)."""
    return load_upstream_data(
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
        multi_label=multi_label,
        num_labels=data_args.num_labels,
        num_train_examples=data_args.num_train_examples,
        seed=seed,
        cache_dir=data_args.cache_dir,
    )


class WithoutExamples:
    """Filter predicate: False for the examples of `held_out` (matched by their image's bytes or path)."""

    def __init__(self, image_column: str, held_out):
        self.image_column = image_column
        fingerprints = [image_fingerprint(example[image_column]) for example in held_out]
        self.count, self.fingerprints = len(fingerprints), set(fingerprints)

    def __call__(self, example) -> bool:
        return image_fingerprint(example[self.image_column]) not in self.fingerprints


def _check_label_type(features, label_column: str, where: str) -> None:
    """Refuse a label column that cannot hold class ids, before anything is decoded."""
    label = image_data.element_feature(features[label_column])
    is_class_id = isinstance(label, datasets.ClassLabel) or (
        isinstance(label, datasets.Value) and label.dtype.startswith(("int", "uint"))
    )
    if not is_class_id:
        raise InputError(
            f"{where}: the label column {label_column!r} holds {features[label_column]}: labels must be integer class "
            "ids (0..C-1) or a ClassLabel; encode string labels first (datasets' `class_encode_column`), or pass "
            "--label-column."
        )


def _check_label_range(dataset: datasets.Dataset, label_column: str, num_classes: int, split: str) -> None:
    """Every label id of a map-style split within 0..num_classes-1, checked on the Arrow column (no decoding)."""
    column = dataset.with_format("arrow")[label_column]
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = pc.list_flatten(column)
    if column.null_count:
        raise InputError(f"The {split} split has {column.null_count} example(s) without a label in {label_column!r}.")
    if len(column) == 0:
        return
    extremes = pc.min_max(column)
    low, high = extremes["min"].as_py(), extremes["max"].as_py()
    if low < 0 or high >= num_classes:
        raise InputError(
            f"The {split} split's label column {label_column!r} has class ids from {low} to {high}: expected ids in "
            f"0..{num_classes - 1} ({num_classes} classes; pass --num-labels if the data "
            "does not declare them all)."
        )


def _label_space(train, label_column: str, multi_label: bool, num_labels: int | None) -> LabelSpace:
    element = image_data.element_feature(train.features[label_column])
    if isinstance(element, datasets.ClassLabel):
        names = list(element.names)
    elif num_labels is not None:
        names = [str(index) for index in range(num_labels)]
    elif isinstance(train, datasets.Dataset):
        column = train.with_format("arrow")[label_column]
        values = column.combine_chunks().flatten() if multi_label else column
        names = [str(index) for index in range(int(np.max(np.asarray(values))) + 1)]
    else:
        raise InputError(
            f"The label column {label_column!r} does not name its classes and a stream cannot be counted: pass --num-labels."
        )
    if num_labels is not None and num_labels != len(names):
        raise InputError(f"--num-labels {num_labels} disagrees with the {len(names)} classes the data declares.")
    if len(names) < 2 and not multi_label:
        raise InputError(f"Single-label training needs at least 2 classes; the data has {len(names)}.")
    return LabelSpace(len(names), names, multi_label)


# --- Augmentation and batching (run in the DataLoader workers) ---------------------------------------


def inception_crop_box(
    rng: np.random.Generator, width: int, height: int, area_range, aspect_ratio_range, attempts: int
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random box with area fraction and aspect ratio in the given ranges.

    Aspect ratios are drawn log-uniformly. After `attempts` boxes that do not fit, the largest centred box
    whose aspect ratio is within range.
    """
    area = width * height
    log_low, log_high = math.log(aspect_ratio_range[0]), math.log(aspect_ratio_range[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(*area_range)
        aspect_ratio = math.exp(rng.uniform(log_low, log_high))
        crop_width = round(math.sqrt(target_area * aspect_ratio))
        crop_height = round(math.sqrt(target_area / aspect_ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            return left, top, left + crop_width, top + crop_height
    ratio = width / height
    if ratio < aspect_ratio_range[0]:
        crop_width, crop_height = width, round(width / aspect_ratio_range[0])
    elif ratio > aspect_ratio_range[1]:
        crop_width, crop_height = round(height * aspect_ratio_range[1]), height
    else:
        crop_width, crop_height = width, height
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


class BatchBuilder:
    """Collate function: decode, augment (training) or resize (evaluation), and batch examples.

    Items are `(example, key)`; the key (a tuple of ints) seeds the example's crop and flip. Returns
    `pixel_values` (B, 3, S, S) in [-1, 1], `labels` (B,) int64 or multi-hot (B, C) float32, `weights` (B,)
    float32 (0 for unreadable images), `unreadable` (names).
    """

    def __init__(
        self,
        image_column: str,
        label_column: str,
        labels: LabelSpace,
        image_size: int,
        seed: int,
        train: bool,
        crop_area_range=CROP_AREA_RANGE,
        crop_aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
        crop_attempts: int = CROP_ATTEMPTS,
        flip_probability: float = HORIZONTAL_FLIP_PROBABILITY,
    ):
        self.image_column, self.label_column, self.labels = image_column, label_column, labels
        self.image_size, self.seed, self.train = int(image_size), int(seed), train
        self.crop_area_range, self.crop_aspect_ratio_range = tuple(crop_area_range), tuple(crop_aspect_ratio_range)
        self.crop_attempts, self.flip_probability = crop_attempts, flip_probability
        # The project's preprocessing does the resize to the training size and the scaling to [-1, 1].
        self.processor = bit_image_processor(self.image_size)

    @classmethod
    def for_recipe(cls, source: UpstreamData, recipe, seed: int, train: bool) -> BatchBuilder:
        """Training batches with the recipe's inception crop and flip, or evaluation batches (a plain resize)."""
        augmentation = (
            {
                "crop_area_range": recipe.crop_area_range,
                "crop_aspect_ratio_range": recipe.crop_aspect_ratio_range,
                "flip_probability": recipe.horizontal_flip_probability,
            }
            if train
            else {}
        )
        columns = (source.image_column, source.label_column, source.labels, recipe.image_size, seed)
        return cls(*columns, train=train, **augmentation)

    def augment(self, image: Image.Image, key: tuple[int, ...]) -> Image.Image:
        rng = np.random.default_rng([self.seed, *key])
        box = inception_crop_box(
            rng, *image.size, self.crop_area_range, self.crop_aspect_ratio_range, self.crop_attempts
        )
        image = image.crop(box)
        if rng.random() < self.flip_probability:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __call__(self, items: list) -> dict:
        images, weights, unreadable = [], [], []
        for example, key in items:
            try:
                image = read_image(example[self.image_column])
            except UnreadableImage as error:
                unreadable.append(error.name)
                image, weight = Image.new("RGB", (self.image_size, self.image_size), (128, 128, 128)), 0.0
            else:
                weight = 1.0
                if self.train:
                    image = self.augment(image, key)
            # Small crops are upsampled here by the processor (resize to image_size x image_size, bilinear).
            images.append(image)
            weights.append(weight)
        pixel_values = self.processor(images, return_tensors="pt")["pixel_values"].to(torch.float32)
        return {
            "pixel_values": pixel_values,
            "labels": self._labels([example[self.label_column] for example, _ in items]),
            "weights": torch.tensor(weights, dtype=torch.float32),
            "unreadable": unreadable,
        }

    def _labels(self, values: list) -> torch.Tensor:
        num_classes = self.labels.num_classes
        if not self.labels.multi_label:
            labels = torch.tensor([int(value) for value in values], dtype=torch.int64)
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                raise InputError(f"Label ids {labels.tolist()} outside 0..{num_classes - 1}.")
            return labels
        multi_hot = torch.zeros(len(values), num_classes, dtype=torch.float32)
        for row, value in enumerate(values):
            ids = [int(v) for v in (value or [])]
            if any(v < 0 or v >= num_classes for v in ids):
                raise InputError(f"Label ids {ids} outside 0..{num_classes - 1}.")
            multi_hot[row, ids] = 1.0
        return multi_hot


# --- Map-style data: positions of an endless stream of epochs -----------------------------------------


class EpochStream(torch.utils.data.Dataset):
    """Position p -> (example `index_of(p)` of the dataset, key (p,)): epochs in the seeded order of
    `image_data.EpochOrder`, each epoch a permutation seeded by (seed, epoch)."""

    def __init__(self, dataset: datasets.Dataset, seed: int):
        self.dataset = dataset
        self.order = EpochOrder(len(dataset), seed)

    def index_of(self, position: int) -> int:
        return self.order.index_of(position)

    def __getitem__(self, position: int):
        return self.dataset[self.index_of(position)], (int(position),)

    def __getitems__(self, positions: list[int]) -> list:
        indices = [self.index_of(position) for position in positions]
        columns = self.dataset[indices]  # one columnar read for the whole batch
        return [
            ({name: values[row] for name, values in columns.items()}, (int(position),))
            for row, position in enumerate(positions)
        ]


class StepBatchSampler(torch.utils.data.Sampler):
    """One process's micro-batches of stream positions for optimizer steps `start_step` .. `total_steps - 1`."""

    def __init__(
        self,
        per_device_batch_size: int,
        num_processes: int,
        process_index: int,
        accumulation_steps: int,
        start_step: int,
        total_steps: int,
    ):
        self.batch, self.processes, self.rank = per_device_batch_size, num_processes, process_index
        self.accumulation, self.start_step, self.total_steps = accumulation_steps, start_step, total_steps

    def global_batch_size(self) -> int:
        return self.batch * self.processes * self.accumulation

    def positions(self, step: int, micro_batch: int) -> list[int]:
        first = step * self.global_batch_size() + (micro_batch * self.processes + self.rank) * self.batch
        return list(range(first, first + self.batch))

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            for micro_batch in range(self.accumulation):
                yield self.positions(step, micro_batch)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accumulation


# --- Streaming data ------------------------------------------------------------------------------------


def worker_batch_count(total_batches: int, worker: int, num_workers: int) -> int:
    """How many of the first `total_batches` batches of a DataLoader come from `worker` (round robin)."""
    return max(0, math.ceil((total_batches - worker) / num_workers))


STREAM_START = {"epoch": 0, "window": 0, "count": 0, "state": None}  # a worker's position before its first example


class ResumableStream(torch.utils.data.IterableDataset):
    """This process's share of a streaming dataset, repeated over epochs, from a given micro-batch on.

    Each DataLoader worker reads its shards in windows of `window_size` examples, yields each window in a
    seeded random order, and keeps exactly the examples of its batches among micro-batches `batches_done` ..
    `total_batches - 1` of this process. Items are `(example, key, position)`; `position` is where the
    example's window starts: epoch, window index, the worker's example count and the `datasets` state_dict
    there (None at an epoch's start). Restarting a worker from the position of the last example trained on
    re-reads, undecoded, the part of that window already trained on: at most `window_size` examples, however
    long the run.

    Why windows and not `datasets`' shuffle buffer: the buffer's content is not part of `datasets`'
    state_dict (it is lost on resume), so a resume could not continue the same order; a window holds no
    examples across a window boundary, so the state_dict there is the whole state.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        per_device_batch_size: int,
        batches_done: int,
        total_batches: int,
        process_index: int,
        seed: int,
        window_size: int,
        resume_positions: dict[int, dict] | None = None,
    ):
        self.dataset, self.batch = dataset, per_device_batch_size
        self.batches_done, self.total_batches, self.rank = batches_done, total_batches, process_index
        self.seed, self.window_size = int(seed), int(window_size)
        self.resume_positions = resume_positions or {}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip = worker_batch_count(self.batches_done, worker, workers) * self.batch
        stop = worker_batch_count(self.total_batches, worker, workers) * self.batch
        position = self.resume_positions.get(worker, STREAM_START) if skip else STREAM_START
        epoch, window, count, state = position["epoch"], position["window"], position["count"], position["state"]
        _quiet_empty_shuffle_buffer_warning()
        while count < stop:
            self.dataset.set_epoch(epoch)
            if state is not None:
                self.dataset.load_state_dict(state)
            examples = iter(self.dataset)
            try:
                produced = False
                while count < stop:
                    here = {"epoch": epoch, "window": window, "count": count, "state": state}
                    chunk = list(itertools.islice(examples, self.window_size))
                    if not chunk:
                        break
                    produced = True
                    state = self.dataset.state_dict()  # where the next window starts
                    order = np.random.default_rng([self.seed, self.rank, worker, epoch, window]).permutation(
                        len(chunk)
                    )
                    for index in order:
                        if count >= stop:
                            return
                        if count >= skip:
                            yield chunk[index], (self.rank, worker, count), here
                        count += 1
                    window += 1
            finally:
                examples.close()
            if not produced:
                raise InputError(
                    f"DataLoader worker {worker} of process {self.rank} received no data: the stream has fewer shards "
                    "than processes x workers (use fewer --dataloader-num-workers or more shards), or the "
                    "--validation-examples hold-out took all of its examples."
                )
            epoch, window, state = epoch + 1, 0, None


class StreamBatchBuilder:
    """Collate for `ResumableStream` items: the BatchBuilder's batch, plus `stream_position`, the position of
    the batch's last example and the worker that produced it (what a checkpoint records to resume from)."""

    def __init__(self, builder: BatchBuilder):
        self.builder = builder

    def __call__(self, items: list) -> dict:
        batch = self.builder([(example, key) for example, key, _ in items])
        _, last_key, last_position = items[-1]
        batch["stream_position"] = {"worker": last_key[1], **last_position}
        return batch


class _EmptyShuffleBufferFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer" not in record.getMessage()


def _quiet_empty_shuffle_buffer_warning() -> None:
    """`datasets` warns that a restored shuffle buffer starts empty; ours holds one example (it only shuffles the
    shard order) and is empty between examples, so nothing is lost."""
    iterable_logger = logging.getLogger("datasets.iterable_dataset")
    if not any(isinstance(f, _EmptyShuffleBufferFilter) for f in iterable_logger.filters):
        iterable_logger.addFilter(_EmptyShuffleBufferFilter())


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C (SIGINT, which the terminal or the launcher sends to the whole process
    group) is the training process's to handle: it finishes the step, saves and says how to resume. SIGTERM
    still ends a worker (that is how its DataLoader stops it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(
    source: UpstreamData,
    builder: BatchBuilder,
    accelerator,
    *,
    seed: int,
    per_device_batch_size: int,
    accumulation: int,
    start_step: int,
    total_steps: int,
    num_workers: int,
    shuffle_buffer_size: int,
    stream_positions: dict[int, dict],
):
    """This process's micro-batches from `start_step` on (a stream's workers restart at `stream_positions`).

    Sharding is ours (the data position is a function of the step); accelerate only moves batches to the
    device (and wraps the loader for TPU). The loader's own generator seeds its workers, so creating it does
    not consume the global RNG that checkpoints restore. On CUDA, batches come in pinned memory and are copied
    without blocking, so the copy overlaps the host's work on the step instead of stalling it.
    """
    rank, processes = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(seed)
    pin_memory = accelerator.device.type == "cuda"
    if source.streaming:
        stream = image_data.shard_stream(source.train, seed, rank, processes)
        examples = ResumableStream(
            stream,
            per_device_batch_size,
            start_step * accumulation,
            total_steps * accumulation,
            rank,
            seed,
            shuffle_buffer_size,
            stream_positions,
        )
        loader = torch.utils.data.DataLoader(
            examples,
            batch_size=per_device_batch_size,
            num_workers=image_data.max_stream_workers(stream, num_workers),
            collate_fn=StreamBatchBuilder(builder),
            generator=generator,
            worker_init_fn=ignore_interrupts,
            pin_memory=pin_memory,
        )
    else:
        sampler = StepBatchSampler(per_device_batch_size, processes, rank, accumulation, start_step, total_steps)
        loader = torch.utils.data.DataLoader(
            EpochStream(source.train, seed),
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=builder,
            generator=generator,
            worker_init_fn=ignore_interrupts,
            pin_memory=pin_memory,
        )
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=1,
        process_index=0,
        put_on_device=True,
        dispatch_batches=False,
        non_blocking=pin_memory,
    )
