"""Where bit-dedup reads images from: an image folder, or a `datasets` split (map-style or streamed).

A source yields `ImageItem`s in a fixed order, each with its name — the path relative to the folder, or
`split[index]` for a dataset — and its encoded image (a path or bytes, decoded later in worker processes). Its
`fingerprint` changes when its content may have changed (file names, sizes and modification times; a dataset's
fingerprint), and names its cached features (`dedup.features`).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import datasets

from finetune.data import IMAGE_EXTENSIONS, image_source

from .errors import DedupInputError


@dataclasses.dataclass(frozen=True)
class ImageItem:
    name: str
    source: str | bytes  # a file path or the encoded image


class ImageSource(abc.ABC):
    """A sequence of images in a fixed order; `record` says where it came from (for duplicates.json)."""

    record: dict
    flag: str

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def length(self) -> int | None:
        """The number of items when known without reading the source (not for a stream)."""
        return len(self)

    @abc.abstractmethod
    def items(self, start: int = 0) -> Iterator[ImageItem]: ...

    @abc.abstractmethod
    def fingerprint(self) -> str: ...

    @abc.abstractmethod
    def item_at(self, index: int) -> ImageItem:
        """Item `index` (not for a stream)."""

    @abc.abstractmethod
    def fetch(self, names) -> dict[str, str | bytes]:
        """The encoded images of the named items (a stream is read up to the last of them)."""

    @property
    def display_name(self) -> str:
        return self.record.get("dir") or self.record.get("dataset")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


class FolderSource(ImageSource):
    """Every image file under a folder (any depth, hidden files and folders skipped), by relative path."""

    def __init__(self, folder: str | os.PathLike, flag: str):
        self.flag = flag
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DedupInputError(f"{flag} {folder}: not a folder (expected a folder of images, any layout).")
        files = sorted(
            path.relative_to(self.folder).as_posix()
            for path in self.folder.rglob("*")
            if path.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in path.relative_to(self.folder).parts)
            and path.is_file()
        )
        if not files:
            raise DedupInputError(
                f"{flag} {folder}: no image files in it (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...)."
            )
        self.files = files
        self.record = {"dir": str(self.folder.resolve())}

    def __len__(self) -> int:
        return len(self.files)

    def items(self, start: int = 0) -> Iterator[ImageItem]:
        for name in self.files[start:]:
            yield ImageItem(name, str(self.folder / name))

    def item_at(self, index: int) -> ImageItem:
        return ImageItem(self.files[index], str(self.folder / self.files[index]))

    def fetch(self, names) -> dict[str, str | bytes]:
        return {name: str(self.folder / name) for name in names}

    def fingerprint(self) -> str:
        stats = []
        for name in self.files:
            stat = (self.folder / name).stat()
            stats.append((name, stat.st_size, stat.st_mtime_ns))
        return _digest({"dir": self.record["dir"], "files": stats})


class DatasetSource(ImageSource):
    """One split of a `datasets.load_dataset` source (a Hub name, a local dataset folder or a builder such as
    `imagefolder`), its items named `split[index]`; `streaming` reads it as a stream (for upstream sets too large to
    download)."""

    def __init__(
        self,
        name: str,
        *,
        flag: str,
        config: str | None = None,
        split: str = "train",
        image_column: str = "image",
        streaming: bool = False,
        data_dir: str | None = None,
    ):
        self.flag = flag
        self.split = split
        self.streaming = streaming
        shown = f"{flag} {name!r}" + (f" config {config!r}" if config else "")
        try:
            dataset = datasets.load_dataset(name, config, split=split, streaming=streaming, data_dir=data_dir)
        except (ConnectionError, OSError, ValueError, KeyError) as error:
            raise DedupInputError(
                f"{shown} split {split!r}: could not load it with datasets.load_dataset ({error})."
            ) from error
        features = dataset.features
        if features is None or image_column not in features:
            columns = list(features) if features is not None else "unknown (the dataset declares no features)"
            raise DedupInputError(f"{shown} split {split!r}: no column {image_column!r}; the columns are {columns}.")
        feature = features[image_column]
        if not isinstance(feature, datasets.Image) and getattr(feature, "dtype", None) != "string":
            raise DedupInputError(
                f"{shown} split {split!r}: column {image_column!r} is {feature}, expected images (or image paths)."
            )
        dataset = dataset.select_columns([image_column])
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        if not streaming and len(dataset) == 0:
            raise DedupInputError(f"{shown} split {split!r} is empty.")
        self.dataset = dataset
        self.image_column = image_column
        self.record = {"dataset": name, "config": config, "split": split, "image_column": image_column}
        if streaming:
            self.record["streaming"] = True

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a stream has no length")
        return len(self.dataset)

    def length(self) -> int | None:
        if not self.streaming:
            return len(self.dataset)
        split = (self.dataset.info.splits or {}).get(self.split)
        return split.num_examples if split is not None and split.num_examples else None

    def items(self, start: int = 0) -> Iterator[ImageItem]:
        dataset = self.dataset.skip(start) if self.streaming else self.dataset.select(range(start, len(self.dataset)))
        for offset, example in enumerate(dataset):
            entry = example[self.image_column]
            if entry is None:
                yield ImageItem(f"{self.split}[{start + offset}]", b"")
                continue
            yield ImageItem(f"{self.split}[{start + offset}]", image_source(entry))

    def item_at(self, index: int) -> ImageItem:
        entry = self.dataset[int(index)][self.image_column]
        return ImageItem(f"{self.split}[{index}]", image_source(entry) if entry is not None else b"")

    def fetch(self, names) -> dict[str, str | bytes]:
        wanted = {int(name[len(self.split) + 1 : -1]): name for name in names}
        if not self.streaming:
            return {wanted[index]: self.item_at(index).source for index in sorted(wanted)}
        found = {}
        for item in self.items():
            index = int(item.name[len(self.split) + 1 : -1])
            if index in wanted:
                found[item.name] = item.source
            if len(found) == len(wanted) or index >= max(wanted):
                break
        return found

    def fingerprint(self) -> str:
        if self.streaming:
            # A stream cannot be hashed without reading it: its name, configuration, split and declared size.
            return _digest({**self.record, "size": self.length()})
        return _digest({**self.record, "fingerprint": self.dataset._fingerprint})
