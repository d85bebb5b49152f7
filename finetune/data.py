"""Datasets for fine-tuning: image folders and Hub datasets through `image_data`, splits and few-shot subsets.

Loading, split and column lookup and the reading of image cells are `image_data`'s, shared with
pre-training; what is fine-tuning's own lives here: the `image`/`label` (ClassLabel) column contract,
stratified held-out splits and few-shot subsets. Every loader returns an `ImageClassificationData` whose
splits have two columns: `image` (an undecoded `datasets.Image`: path and/or bytes, so decoding happens in
DataLoader workers with `image_data.read_image`, and unreadable files are skipped rather than crashing a
worker) and `label` (a `ClassLabel`). Input that cannot be fine-tuned on (a missing folder or column, one
class, no images, more examples per class requested than a class has) raises `FinetuneInputError` (a
`ValueError`) saying what was expected, before any image is decoded.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import statistics
from collections.abc import Sequence

import datasets
import numpy as np
from PIL import Image

import image_data
from image_data import IMAGE_EXTENSIONS, VALIDATION_SPLIT_NAMES, image_area, image_name, image_source

from .errors import FinetuneInputError
from .hyperrule import IMAGE_SIZE_SAMPLE

logger = logging.getLogger(__name__)

__all__ = [  # re-exported from image_data, where they are defined once
    "IMAGE_EXTENSIONS",
    "VALIDATION_SPLIT_NAMES",
    "image_area",
    "image_name",
    "image_source",
]

# Held-out share of the training set when a dataset has no validation split (the HF image-classification
# example's `train_val_split` default).
DEFAULT_VALIDATION_FRACTION = 0.15
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


def _finetune_input_errors(function):
    """The data layer's `image_data.InputError` as the `FinetuneInputError` bit-finetune reports."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except image_data.InputError as error:
            raise FinetuneInputError(str(error)) from error

    return wrapper


@dataclasses.dataclass
class ImageClassificationData:
    """Training and evaluation splits with columns `image` (undecoded) and `label` (class index)."""

    train: datasets.Dataset | datasets.IterableDataset
    eval: datasets.Dataset | datasets.IterableDataset
    label_names: list[str]
    source: dict  # {"train_dir": ...} or {"name": ..., "config": ...}: where the examples came from
    announcements: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def streaming(self) -> bool:
        return isinstance(self.train, datasets.IterableDataset)

    def train_labels(self) -> np.ndarray:
        return label_array(self.train)

    def with_train(self, train: datasets.Dataset) -> ImageClassificationData:
        return dataclasses.replace(self, train=train)


def label_array(dataset: datasets.Dataset) -> np.ndarray:
    """The class index of every example (read from the Arrow column, no image touched)."""
    return np.asarray(dataset.with_format("numpy", columns=[LABEL_COLUMN])[LABEL_COLUMN], dtype=np.int64)


# --- Image folders ---------------------------------------------------------------------------------


@_finetune_input_errors
def load_image_folders(
    train_dir: str | os.PathLike,
    validation_dir: str | os.PathLike | None = None,
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
) -> ImageClassificationData:
    """Image-folder layout (class = subfolder name) through `datasets`' imagefolder builder."""
    train = image_data.load_image_folder(train_dir, flag="--train-dir").split("train")
    train = _standardize_columns(train, IMAGE_COLUMN, LABEL_COLUMN, where=str(train_dir))
    label_names = train.features[LABEL_COLUMN].names
    source = {"train_dir": str(train_dir)}
    if validation_dir is None:
        data = ImageClassificationData(train, train, label_names, source)
        return split_off_validation(data, validation_fraction, seed)
    evaluation = image_data.load_image_folder(validation_dir, flag="--validation-dir").split("train")
    evaluation = _standardize_columns(evaluation, IMAGE_COLUMN, LABEL_COLUMN, where=str(validation_dir))
    evaluation = _align_labels(evaluation, label_names, where=str(validation_dir))
    source["validation_dir"] = str(validation_dir)
    return ImageClassificationData(train, evaluation, label_names, source)


# --- Hub (or local) datasets with image and label columns ----------------------------------------


@_finetune_input_errors
def load_hub_dataset(
    name: str,
    config: str | None = None,
    *,
    image_column: str | None = IMAGE_COLUMN,
    label_column: str | None = LABEL_COLUMN,
    train_split: str = "train",
    validation_split: str | None = None,
    streaming: bool = False,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
) -> ImageClassificationData:
    """A dataset `datasets.load_dataset(name, config)` reads: a Hub name or a local dataset folder.

    The evaluation split is `validation_split`, else the first of `VALIDATION_SPLIT_NAMES` ("validation",
    "valid", "val", "test") that exists, else a stratified held-out part of the training split (not possible
    when streaming). A column given as None is detected (`image_data.find_image_column`/`find_label_column`).
    """
    loaded = image_data.load_image_dataset(name, config, streaming=streaming)
    where = f"--dataset {name!r} split {train_split!r}"
    train = _standardize_columns(loaded.split(train_split), image_column, label_column, where=where)
    label_names = train.features[LABEL_COLUMN].names
    source = {"name": name, "config": config}
    validation_split = loaded.validation_split_name(validation_split, train_split)
    if validation_split is None:
        if streaming:
            raise FinetuneInputError(
                f"--dataset {name!r} has only the splits {list(loaded.splits)}; a held-out split cannot be stratified "
                "over a stream. Pass --validation-split or drop --streaming."
            )
        data = ImageClassificationData(train, train, label_names, source)
        return split_off_validation(data, validation_fraction, seed)
    where = f"--dataset {name!r} split {validation_split!r}"
    evaluation = _standardize_columns(loaded.splits[validation_split], image_column, label_column, where=where)
    evaluation = _align_labels(evaluation, label_names, where=where)
    source["validation_split"] = validation_split
    data = ImageClassificationData(train, evaluation, label_names, source)
    data.announcements.append(f"Evaluating on the {validation_split!r} split of {name}.")
    return data


def _standardize_columns(dataset, image_column: str | None, label_column: str | None, *, where: str):
    """Rename to `image`/`label`, keep only those, `image` undecoded, `label` a ClassLabel."""
    features = image_data.declared_features(dataset, where)
    image_column = image_data.find_image_column(features, image_column, where)
    label_column = image_data.find_label_column(features, label_column, where)
    dataset = dataset.select_columns([image_column, label_column])
    if image_column != IMAGE_COLUMN or label_column != LABEL_COLUMN:
        dataset = dataset.rename_columns({image_column: IMAGE_COLUMN, label_column: LABEL_COLUMN})
    dataset = image_data.undecoded(dataset, IMAGE_COLUMN)
    label_feature = dataset.features[LABEL_COLUMN]
    if isinstance(label_feature, (datasets.Sequence, datasets.List, list)):
        raise FinetuneInputError(
            f"{where}: column {label_column!r} holds lists of labels (multi-label); bit-finetune fine-tunes single-label "
            "classifiers. For multi-label heads use finetune.BitTrainer directly (its loss and MixUp support them) with "
            "a multi-label compute_metrics (finetune's metrics are single-label accuracies)."
        )
    if not isinstance(label_feature, datasets.ClassLabel):
        if isinstance(dataset, datasets.IterableDataset):
            raise FinetuneInputError(
                f"{where}: column {label_column!r} is {label_feature}; streaming needs a ClassLabel column."
            )
        missing = dataset.data.column(LABEL_COLUMN).null_count  # from the Arrow table, no example decoded
        if missing:
            raise FinetuneInputError(
                f"{where}: column {label_column!r} has {missing} missing label(s); every example needs a class."
            )
        dataset = dataset.class_encode_column(LABEL_COLUMN)
    return dataset


def _align_labels(evaluation, label_names: list[str], *, where: str):
    """Evaluation labels renumbered to the training set's class indices (matched by name)."""
    eval_names = evaluation.features[LABEL_COLUMN].names
    if eval_names == label_names:
        return evaluation
    unknown = sorted(set(eval_names) - set(label_names))
    if unknown:
        raise FinetuneInputError(f"{where}: classes {unknown} do not exist in the training set ({label_names}).")
    return evaluation.align_labels_with_mapping({name: index for index, name in enumerate(label_names)}, LABEL_COLUMN)


# --- In-memory images (the main job's digits) ---------------------------------------------------


def from_images(images: Sequence[Image.Image], labels: Sequence[int], label_names: Sequence[str]) -> datasets.Dataset:
    """A `datasets.Dataset` (undecoded PNG bytes and class labels) from PIL images."""
    features = datasets.Features(
        {IMAGE_COLUMN: datasets.Image(), LABEL_COLUMN: datasets.ClassLabel(names=list(label_names))}
    )
    dataset = datasets.Dataset.from_dict({IMAGE_COLUMN: list(images), LABEL_COLUMN: list(labels)}, features=features)
    return dataset.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))


# --- Splits and few-shot subsets ---------------------------------------------------------------


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): `fraction` of every class held out, at least one example of
    each class kept for training; deterministic for a given seed."""
    if not 0 < fraction < 1:
        raise FinetuneInputError(f"validation fraction {fraction}: expected a number between 0 and 1.")
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = min(round(fraction * len(members)), len(members) - 1)
        held_out.append(members[:count])
        train.append(members[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))


def split_off_validation(data: ImageClassificationData, fraction: float, seed: int) -> ImageClassificationData:
    """Hold out a stratified part of the training split for evaluation (announced)."""
    labels = data.train_labels()
    train_indices, eval_indices = stratified_split(labels, fraction, seed)
    if len(eval_indices) == 0:
        raise FinetuneInputError(
            f"No validation split, and the training set ({len(labels)} examples) is too small to hold out "
            f"{fraction:.0%} of each class; pass a validation set."
        )
    announcement = (
        f"No validation split: holding out {len(eval_indices)} of {len(labels)} training examples "
        f"({fraction:.0%} of each class, stratified, seed {seed}) for evaluation."
    )
    return dataclasses.replace(
        data,
        train=data.train.select(train_indices),
        eval=data.train.select(eval_indices),
        announcements=[*data.announcements, announcement],
    )


def few_shot_indices(
    labels: np.ndarray, examples_per_class: int, seed: int, label_names: Sequence[str] | None = None
) -> np.ndarray:
    """Indices of a balanced random subset: `examples_per_class` of every class, drawn with `seed`."""
    if examples_per_class < 1:
        raise FinetuneInputError(f"--examples-per-class {examples_per_class}: expected a positive number.")
    classes, counts = np.unique(labels, return_counts=True)
    smallest = int(np.argmin(counts))
    if counts[smallest] < examples_per_class:
        name = label_names[classes[smallest]] if label_names is not None else int(classes[smallest])
        raise FinetuneInputError(
            f"--examples-per-class {examples_per_class} is larger than the smallest class: {name!r} has "
            f"{counts[smallest]} training example(s)."
        )
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == label), examples_per_class, replace=False) for label in classes]
    return np.sort(np.concatenate(chosen))


def few_shot_subset(data: ImageClassificationData, examples_per_class: int, seed: int) -> ImageClassificationData:
    if data.streaming:
        raise FinetuneInputError("--examples-per-class draws from the whole training set; drop --streaming.")
    indices = few_shot_indices(data.train_labels(), examples_per_class, seed, data.label_names)
    return data.with_train(data.train.select(indices))


def check_classes(data: ImageClassificationData) -> None:
    """At least two classes, each with a training example (map-style data)."""
    if data.num_classes < 2:
        raise FinetuneInputError(
            f"The dataset has {data.num_classes} class(es) {data.label_names}; classification needs two or more."
        )
    if not data.streaming:
        present = np.unique(data.train_labels())
        if len(present) < 2:
            raise FinetuneInputError(
                f"The training set holds examples of one class only ({data.label_names[present[0]]!r})."
            )


# --- Image sizes, read from headers --------------------------------------------------------------


def median_image_area(dataset, sample_size: int = IMAGE_SIZE_SAMPLE, seed: int = 0) -> tuple[float, int]:
    """(median image area, number of images measured) over `sample_size` images at most.

    A map-style dataset larger than the sample is sampled at random (seeded); a stream contributes its
    first `sample_size` examples. Only file headers are read.
    """
    if isinstance(dataset, datasets.IterableDataset):
        entries = [example[IMAGE_COLUMN] for example in dataset.take(sample_size)]
    else:
        indices = np.arange(len(dataset))
        if len(indices) > sample_size:
            indices = np.sort(np.random.default_rng(seed).choice(indices, sample_size, replace=False))
        entries = dataset.select(indices)[IMAGE_COLUMN]
    areas = [area for area in map(image_area, entries) if area is not None]
    if not areas:
        raise FinetuneInputError("None of the sampled training images could be read; check the dataset's image files.")
    return float(statistics.median(areas)), len(areas)
