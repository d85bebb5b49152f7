"""Loading image data with `datasets`: image folders, Hub names, local folders, builders with data files,
streams; finding the splits and the image and label columns.

    source = load_image_folder("photos/train")                       # class subfolders (or split folders)
    source = load_image_dataset("user/name", "config", streaming=True)
    source = load_image_dataset("parquet", data_files=["shards/*.parquet"])
    train = source.split("train")
    evaluation = source.validation_split()                           # "validation", "valid", "val", "test"
    image_column = find_image_column(train.features)                 # typed, then named candidates

Everything here reads metadata only (folder listings, features, Arrow columns): no image is decoded, so bad
input is refused before any work, with an `InputError` that names what was given and what was expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import datasets

from .errors import InputError

# The evaluation split of a source without one named: the first of these that exists (not the training split).
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")
# Columns taken as the images and the labels when none is named and no column has the matching feature type.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "class", "target")
# Arrow types an image column may hold besides an Image feature: file paths or encoded image bytes.
IMAGE_VALUE_TYPES = ("string", "large_string", "binary", "large_binary")
# File extensions `datasets`' imagefolder builder reads as images.
IMAGE_EXTENSIONS = frozenset(
    extension.lower() for extension in datasets.packaged_modules.imagefolder.ImageFolder.EXTENSIONS
)
LIST_FEATURES = (datasets.List, datasets.Sequence, datasets.LargeList)


@dataclasses.dataclass
class ImageSource:
    """The splits of one source as `datasets` loaded them, and how the user named the source (for messages)."""

    splits: Mapping[str, datasets.Dataset | datasets.IterableDataset]
    given: str  # e.g. "--train-dir photos/train", "--dataset 'user/name'"

    @property
    def streaming(self) -> bool:
        return any(isinstance(split, datasets.IterableDataset) for split in self.splits.values())

    def split(self, name: str, flag: str = "--train-split"):
        if name not in self.splits:
            raise InputError(
                f"{self.given} has no split {name!r} (its splits: {', '.join(self.splits)}): pass {flag}."
            )
        return self.splits[name]

    def validation_split_name(
        self, requested: str | None = None, train_split: str = "train", flag: str = "--validation-split"
    ) -> str | None:
        """`requested` (which must exist), else the first of `VALIDATION_SPLIT_NAMES` present besides the
        training split, else None."""
        if requested is not None:
            self.split(requested, flag)
            return requested
        return next((name for name in VALIDATION_SPLIT_NAMES if name in self.splits and name != train_split), None)


@contextlib.contextmanager
def explained_load_errors(given: str, expected: str):
    """`datasets.load_dataset`'s failures on unusable input as an InputError saying what was expected."""
    try:
        yield
    except (OSError, ValueError) as error:  # not found, empty, offline, unknown config (ConnectionError is an OSError)
        raise InputError(
            f"{given}: could not load it with datasets.load_dataset ({type(error).__name__}: {error}). "
            f"Expected {expected}."
        ) from error


IMAGE_FOLDER_LAYOUT = "a folder with one subfolder of images per class (e.g. DIR/cat/1.jpg, DIR/dog/2.jpg)"


def check_image_folder(folder: str | os.PathLike, flag: str = "--train-dir") -> Path:
    """The folder, if it holds images in at least two class folders; else a clear error.

    The class of an image is the folder it is in, as `datasets`' imagefolder builder labels it (so split
    folders, DIR/train/cat/1.jpg, work too). Hidden files and folders inside it are skipped, as `datasets`
    skips them; the folder's own location may be hidden (e.g. ~/.cache/...). The walk stops at the second
    class: a large folder is not listed twice.
    """
    layout = f"{flag} must be {IMAGE_FOLDER_LAYOUT}"
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{layout}; {folder} is not a folder.")
    classes, loose_images = [], False
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        if any(Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".") for name in files):
            if Path(directory) == folder:
                loose_images = True
            elif Path(directory).name not in classes:
                classes.append(Path(directory).name)
                if len(classes) == 2:
                    return folder
    if not classes and not loose_images:
        raise InputError(
            f"{layout}; no image files in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...)."
        )
    found = f"one class ({classes[0]!r})" if classes else "images but no class subfolders"
    raise InputError(f"{layout}; found {found} in {folder}. Classification needs at least two classes.")


def load_image_folder(
    folder: str | os.PathLike, *, flag: str = "--train-dir", streaming: bool = False, cache_dir: str | None = None
) -> ImageSource:
    """An image folder through `datasets`' imagefolder builder (class = folder name; split folders
    train/, validation/, test/ become splits)."""
    folder = check_image_folder(folder, flag)
    given = f"{flag} {folder}"
    with explained_load_errors(given, IMAGE_FOLDER_LAYOUT):
        splits = datasets.load_dataset("imagefolder", data_dir=str(folder), streaming=streaming, cache_dir=cache_dir)
    return ImageSource(dict(splits), given)


def load_image_dataset(
    name: str,
    config: str | None = None,
    *,
    data_files: list[str] | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    flag: str = "--dataset",
) -> ImageSource:
    """What `datasets.load_dataset(name, config, data_files=...)` reads: a Hub dataset id, a local folder of
    data files (parquet, webdataset, ...), or a builder name with `data_files`."""
    given = f"{flag} {name!r}" + (f" --dataset-config {config!r}" if config is not None else "")
    expected = "a Hub dataset id, a local folder of parquet/webdataset shards, or a datasets builder with --data-files"
    with explained_load_errors(given, expected):
        splits = datasets.load_dataset(name, config, data_files=data_files, streaming=streaming, cache_dir=cache_dir)
    return ImageSource(dict(splits), given)


# --- columns ---------------------------------------------------------------------------------------------------


def element_feature(feature):
    """The feature of a list column's elements; any other feature itself."""
    return feature.feature if isinstance(feature, LIST_FEATURES) else feature


def declared_features(dataset, where: str) -> datasets.Features:
    if dataset.features is None:
        raise InputError(
            f"{where}: the dataset declares no features, so its image and label columns are unknown; pass "
            "--image-column and --label-column."
        )
    return dataset.features


def _find_column(features, given: str | None, candidates, flag: str, feature_type, where: str) -> str:
    if given is not None:
        if given not in features:
            raise InputError(f"{where}: no column {given!r} ({flag}); the columns are {list(features)}.")
        return given
    typed = [name for name, feature in features.items() if isinstance(element_feature(feature), feature_type)]
    found = typed or [name for name in candidates if name in features]
    if not found:
        raise InputError(f"{where}: cannot tell which of the columns {list(features)} it is: pass {flag}.")
    return found[0]


def find_image_column(features, given: str | None = None, where: str = "the data") -> str:
    """`given` (which must exist), else the first column with an Image feature, else the first of
    `IMAGE_COLUMN_CANDIDATES` present; the column must hold images, paths or encoded bytes."""
    column = _find_column(features, given, IMAGE_COLUMN_CANDIDATES, "--image-column", datasets.Image, where)
    feature = features[column]
    holds_images = (
        isinstance(feature, datasets.Image)
        or (isinstance(feature, datasets.Value) and feature.dtype in IMAGE_VALUE_TYPES)
        or (isinstance(feature, dict) and bool({"bytes", "path"} & set(feature)))
    )
    if not holds_images:
        raise InputError(
            f"{where}: the image column {column!r} holds {feature}: expected images (an Image feature, file paths "
            "or encoded image bytes). Pass --image-column."
        )
    return column


def find_label_column(features, given: str | None = None, where: str = "the data") -> str:
    """`given` (which must exist), else the first column with a ClassLabel feature (or a list of them), else
    the first of `LABEL_COLUMN_CANDIDATES` present."""
    return _find_column(features, given, LABEL_COLUMN_CANDIDATES, "--label-column", datasets.ClassLabel, where)


def undecoded(dataset, column: str):
    """The dataset with `column` read as undecoded images ({bytes, path}): decoding happens later, where
    `cells.read_image` skips and names what cannot be read."""
    return dataset.cast_column(column, datasets.Image(decode=False))
