"""A task's VTAB-1k examples, read once from its source and kept in the run's output folder.

`prepare_task` reads the task's three slices (800 training, 200 validation, test; `vtab.registry.TaskSource`) with
`datasets` — streamed, so only the examples used are read from a Hub dataset — derives each label with the task's
`LabelRule`, decodes every image once (unreadable ones are skipped, named and counted, as bit-finetune does) and
writes them as Arrow files into `O/data/<task>/`, atomically, with the task's definition. A later run (or a
`--resume`) with the same definition reads them from there and nothing from the source. Every failure is a
`FinetuneInputError` naming the task: a source that cannot be reached (offline, or `HF_HUB_OFFLINE`), a missing
split or column, an annotation that gives no label, fewer than the 800 + 200 training examples VTAB-1k needs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
from datasets.arrow_writer import ArrowWriter
from huggingface_hub import constants as hub_constants
from tqdm.auto import tqdm

from finetune.cli import quiet_local_loading
from finetune.data import IMAGE_COLUMN, LABEL_COLUMN, ImageClassificationData
from finetune.errors import FinetuneInputError
from modeling_bit import load_rgb_image
from modeling_bit.file_utils import atomic_directory, atomic_write_json
from modeling_bit.image_processing_bit import UnreadableImageError

from .labels import LabelError
from .registry import SELECTION_TRAIN_EXAMPLES, SELECTION_VALIDATION_EXAMPLES, SplitSlice, VtabTask

logger = logging.getLogger(__name__)

TASK_FILE = "task.json"
PARTS = ("train", "validation", "test")
# `--protocol`: "final" trains on all 1,000 and evaluates on the test split (the reported number); "selection"
# trains on the 800 and evaluates on the 200 (for comparing settings without looking at the test split).
FINAL, SELECTION = "final", "selection"
PROTOCOLS = (FINAL, SELECTION)


class TaskSourceError(FinetuneInputError):
    """A task's source cannot be read (unreachable, missing split or column)."""


@dataclasses.dataclass
class PreparedTask:
    """A task's examples on disk: `train` (800), `validation` (200), `test`, and the unreadable images skipped."""

    task: VtabTask
    folder: Path
    parts: dict[str, datasets.Dataset]
    label_names: list[str]
    unreadable: dict[str, list[str]]
    builder: str | None = None  # the `datasets` builder that read the source (webdataset, parquet, imagefolder, ...)

    def data(self, protocol: str) -> ImageClassificationData:
        """The engine's data for `protocol`: train on train + validation, evaluate on test ("final"), or train on
        train and evaluate on validation ("selection")."""
        if protocol == FINAL:
            train = datasets.concatenate_datasets([self.parts["train"], self.parts["validation"]])
            evaluation, split = self.parts["test"], self.task.source.test
        else:
            train, evaluation, split = self.parts["train"], self.parts["validation"], self.task.source.validation
        source = self.task.source
        # What the fine-tuned folder records as its data (bit_finetune_args.json, the task's model card).
        record = {
            "name": source.dataset,
            "config": source.config,
            "validation_split": split,
            "vtab_task": self.task.name,
            "builder": self.builder,
        }
        if source.data_dir is not None:
            record["data_dir"] = source.data_dir
        return ImageClassificationData(train, evaluation, list(self.label_names), record)

    @property
    def num_unreadable(self) -> int:
        return sum(len(names) for names in self.unreadable.values())


def prepare_task(task: VtabTask, folder: str | os.PathLike, *, quiet: bool = False) -> PreparedTask:
    """The task's examples, from `folder` when it holds this definition's, else read from the source into it."""
    folder = Path(folder)
    prepared = load_prepared(task, folder)
    if prepared is not None:
        return prepared
    splits = _open_source(task)
    builder = next(iter(splits.values())).info.builder_name if splits else None
    parts, unreadable, label_names = {}, {}, None
    with atomic_directory(folder) as staging:
        for part, split_slice in task.source.slices().items():
            names, unreadable[part], count = _write_part(task, splits, split_slice, staging / f"{part}.arrow", quiet)
            label_names = label_names or names
            expected = {"train": SELECTION_TRAIN_EXAMPLES, "validation": SELECTION_VALIDATION_EXAMPLES}.get(part)
            if expected is not None and count < expected:
                raise FinetuneInputError(
                    f"task {task.name}: {task.source.describe()} has only {count} example(s) in "
                    f"{split_slice}; VTAB-1k needs 1,000 training examples ({SELECTION_TRAIN_EXAMPLES} in "
                    f"source.train and {SELECTION_VALIDATION_EXAMPLES} in source.validation)."
                )
            if part == "test" and count == 0:
                raise FinetuneInputError(f"task {task.name}: the test split {split_slice} is empty.")
        record = {"task": task.to_dict(), "label_names": label_names, "unreadable": unreadable, "builder": builder}
        atomic_write_json(staging / TASK_FILE, record)
    for part in PARTS:
        parts[part] = datasets.Dataset.from_file(str(folder / f"{part}.arrow"))
    return PreparedTask(task, folder, parts, label_names, unreadable, builder)


def load_prepared(task: VtabTask, folder: Path) -> PreparedTask | None:
    """The examples prepared earlier for exactly this task definition, or None."""
    try:
        record = json.loads((folder / TASK_FILE).read_text())
        if record["task"] != json.loads(json.dumps(task.to_dict())):
            return None
        parts = {part: datasets.Dataset.from_file(str(folder / f"{part}.arrow")) for part in PARTS}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return PreparedTask(
        task, folder, parts, list(record["label_names"]), dict(record["unreadable"]), record.get("builder")
    )


# --- Reading a source -------------------------------------------------------------------------------------------


def _write_part(
    task: VtabTask, splits: dict, split_slice: SplitSlice, path: Path, quiet: bool
) -> tuple[list[str], list[str], int]:
    """Write one slice's readable examples (image bytes, derived label) to `path`; (class names, unreadable, count
    of examples in the slice)."""
    examples, dataset_names = _open_slice(task, splits, split_slice)
    label_names = task.label.class_names(dataset_names)
    features = datasets.Features(
        {IMAGE_COLUMN: datasets.Image(decode=False), LABEL_COLUMN: datasets.ClassLabel(names=label_names)}
    )
    unreadable, count = [], 0
    progress = tqdm(
        examples, total=split_slice.size, desc=f"Reading {task.name} {split_slice}", unit="image", disable=quiet
    )
    with ArrowWriter(features=features, path=str(path)) as writer:
        for index, example in enumerate(_reading(task, split_slice, progress), start=split_slice.start):
            count += 1
            name, data = _image_of(task, example, split_slice, index)
            try:
                label = task.label.label(_column(task, example, task.label.column))
            except LabelError as error:
                raise FinetuneInputError(
                    f"task {task.name}: example {split_slice.split}[{index}] of {task.source.describe()}: {error} "
                    f"(label: {task.label.describe()})."
                ) from error
            try:
                load_rgb_image(data)
            except UnreadableImageError:
                unreadable.append(name)
                continue
            writer.write({IMAGE_COLUMN: {"bytes": data, "path": name}, LABEL_COLUMN: label})
        writer.finalize()
    if unreadable:
        logger.warning(
            "%s: skipped %d unreadable image(s) of %s: %s",
            task.name,
            len(unreadable),
            split_slice,
            ", ".join(unreadable),
        )
    return label_names, unreadable, count


def _open_source(task: VtabTask) -> dict:
    """The source's splits, opened once: streamed (only what is read is fetched), or loaded and shuffled with the
    task's `shuffle_seed`."""
    source = task.source
    options = {"name": source.config, "data_dir": source.data_dir}
    try:
        with quiet_local_loading(source.is_local):
            if source.shuffle_seed is None:
                return dict(datasets.load_dataset(source.dataset, streaming=True, **options))
            splits = datasets.load_dataset(source.dataset, **options)
            return {name: split.shuffle(seed=source.shuffle_seed) for name, split in splits.items()}
    except Exception as error:  # whatever datasets raises for this source: the task cannot run, say which
        raise _source_error(task, source.train, error) from error


def _open_slice(task: VtabTask, splits: dict, split_slice: SplitSlice) -> tuple[Iterator[dict], list[str] | None]:
    """The slice's examples (images undecoded) and the dataset's class names for the label column, if it has any."""
    source = task.source
    if split_slice.split not in splits:
        raise TaskSourceError(
            f"task {task.name}: {source.describe()} has no split {split_slice.split!r} ({split_slice}); its splits "
            f"are {sorted(splits)}."
        )
    dataset = splits[split_slice.split]
    try:
        features = dataset.features
        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.decode(False)
        else:
            dataset = dataset.cast_column(source.image_column, datasets.Image(decode=False))
    except Exception as error:  # e.g. no such image column in a loaded split
        raise _source_error(task, str(split_slice), error) from error
    label_feature = (features or {}).get(task.label.column)
    names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    if isinstance(dataset, datasets.Dataset):
        stop = len(dataset) if split_slice.stop is None else min(split_slice.stop, len(dataset))
        examples = iter(dataset.select(range(min(split_slice.start, stop), stop)))
    else:
        examples = iter(itertools.islice(dataset, split_slice.start, split_slice.stop))
    return examples, names


def _reading(task: VtabTask, split_slice: SplitSlice, examples) -> Iterator[dict]:
    """`examples`, with a failure while streaming them reported as the task's source error."""
    iterator = iter(examples)
    while True:
        try:
            example = next(iterator)
        except StopIteration:
            return
        except Exception as error:  # a stream that breaks (network, corrupt shard) stops the task, named
            raise _source_error(task, str(split_slice), error) from error
        yield example


def _source_error(task: VtabTask, what: str, error: Exception) -> TaskSourceError:
    source = task.source
    where = f"task {task.name}: cannot read {what} of {source.describe()}"
    if source.is_local:
        return TaskSourceError(f"{where} ({type(error).__name__}: {error}).")
    offline = (
        "HF_HUB_OFFLINE is set, so the Hub is not contacted"
        if hub_constants.HF_HUB_OFFLINE
        else "the Hugging Face Hub could not be reached"
    )
    return TaskSourceError(
        f"{where}: offline? {offline} ({type(error).__name__}: {error}). The VTAB datasets are read from the Hub the "
        "first time (then kept in the output folder); run once with network access, or give the task a local copy "
        "of its data with --task-file."
    )


def _column(task: VtabTask, example: dict, column: str):
    if column not in example:
        raise TaskSourceError(
            f"task {task.name}: {task.source.describe()} has no column {column!r}; its columns are "
            f"{sorted(key for key in example if not key.startswith('__'))}."
        )
    return example[column]


def _image_of(task: VtabTask, example: dict, split_slice: SplitSlice, index: int) -> tuple[str, bytes | str]:
    """(a name for the image, its encoded bytes or an empty marker) from an undecoded `datasets.Image` value."""
    entry = _column(task, example, task.source.image_column)
    name = f"{split_slice.split}[{index}]"
    if isinstance(entry, dict):
        path = entry.get("path")
        # A file of a shard (e.g. s0000012.webp) is named with its split; a local file by its path.
        name = (path if Path(path).is_absolute() else f"{split_slice.split}/{path}") if path else name
        data = entry.get("bytes")
        if data is None and entry.get("path"):
            try:
                data = Path(entry["path"]).read_bytes()
            except OSError:
                data = b""
        return name, data or b""
    if isinstance(entry, str):
        try:
            return entry, Path(entry).read_bytes()
        except OSError:
            return entry, b""
    raise TaskSourceError(
        f"task {task.name}: column {task.source.image_column!r} of {task.source.describe()} holds "
        f"{type(entry).__name__}, expected images."
    )
