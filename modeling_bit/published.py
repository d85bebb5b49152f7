"""The published BiT checkpoints: finding one by name, and downloading it.

The catalog is the variant table's (`variants.PUBLISHED_CHECKPOINTS`, docs/recipe.md "Published checkpoints"):

- `BiT-{S,M}-R{50x1,50x3,101x1,101x3,152x2,152x4}`: upstream BiT-S (ILSVRC-2012, 1,000-class head) and BiT-M
  (ImageNet-21k, 21,843-class head), at `<base>/<name>.npz`;
- `BiT-M-R{...}-ILSVRC2012`: BiT-M fine-tuned on ILSVRC-2012 (1,000 classes), at `<base>/<name>.npz`;
- the R50x1 students distilled from BiT-M-R152x2 at 224 and 160 pixels, and their two R152x2 teachers
  (ILSVRC-2012 heads), at `<base>/distill/R50x1_224.npz`, ... We name them `BiT-R50x1-distilled-224`,
  `BiT-M-R152x2-teacher-384`, ...; the file path without `.npz` (`distill/R50x1_224`) is accepted too.

`<base>` is the base URL `$BIT_WEIGHTS_URL` (a mirror of the bucket), by default
https://storage.googleapis.com/bit_models. Loading by name (`from_pretrained("bit-m-r101x3")`) is `by_name.py`.
"""

from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path

from .download import download_to_cache
from .variants import (
    BIT_WEIGHTS_URL_ENV,
    DEFAULT_BIT_WEIGHTS_URL,
    ILSVRC2012_FINETUNED_RESOLUTION,
    PUBLISHED_CHECKPOINTS,
    UPSTREAM_RESOLUTION,
    PublishedCheckpoint,
)

PUBLISHED_CHECKPOINT_NAMES: list[str] = list(PUBLISHED_CHECKPOINTS)
_BY_LOWER_NAME = {
    **{entry.file.removesuffix(".npz").lower(): entry for entry in PUBLISHED_CHECKPOINTS.values()},
    **{name.lower(): entry for name, entry in PUBLISHED_CHECKPOINTS.items()},
}


def find_published_checkpoint(name: str | os.PathLike) -> PublishedCheckpoint | None:
    """The published checkpoint called `name` (any case; `distill/R50x1_224` style paths too), or None."""
    return _BY_LOWER_NAME.get(str(name).strip().lower())


def published_names_help() -> str:
    return ", ".join(PUBLISHED_CHECKPOINT_NAMES)


# --- downloading a published checkpoint ----------------------------------------------------------------------


def download_published(
    checkpoint: PublishedCheckpoint, *, url: str | None = None, local_files_only: bool = False
) -> Path:
    """The cached `.npz` of a published checkpoint (from `url`, by default `checkpoint.url`), downloaded first if
    needed and allowed (checked before it is cached)."""
    return download_to_cache(
        url or checkpoint.url,
        validate=functools.partial(validate_published_npz, checkpoint=checkpoint),
        offline_hint=(
            f"To convert a copy of the file obtained elsewhere: `bit-convert /path/to/{Path(checkpoint.file).name} "
            "--output DIR`, then load DIR."
        ),
        local_files_only=local_files_only,
    )


def validate_npz(path: Path) -> None:
    """Raise `ValueError` unless `path` is a complete `.npz` archive whose members all pass their CRC check."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"not a complete .npz archive: {error}") from error
    if corrupt is not None:
        raise ValueError(f"member {corrupt!r} fails its CRC check")
    if not names or not all(name.endswith(".npy") for name in names):
        raise ValueError("not an .npz archive of arrays")


def validate_bit_npz(path: Path):
    """`validate_npz`, then the tensors of a ResNetV2-BiT; returns the opened checkpoint. Raises `ValueError`."""
    from .checkpoint_reading import CheckpointError, open_checkpoint

    validate_npz(path)
    try:
        return open_checkpoint(path, file_type=".npz")
    except CheckpointError as error:
        raise ValueError(str(error)) from error


def validate_published_npz(path: Path, checkpoint: PublishedCheckpoint) -> None:
    """`validate_bit_npz`, then the architecture and head the published name promises."""
    opened = validate_bit_npz(path)
    found = (tuple(opened.depths), opened.width_factor, opened.num_labels)
    promised = (tuple(checkpoint.depths), checkpoint.width_factor, checkpoint.num_labels)
    if found != promised:
        raise ValueError(
            f"{checkpoint.name} is a ResNetV2-BiT with depths {list(promised[0])}, width {promised[1]} and "
            f"{promised[2]} classes, but the file has depths {list(found[0])}, width {found[1]} and {found[2]} classes"
        )


def download_npz_url(url: str, *, local_files_only: bool = False) -> Path:
    """The cached download of any URL of a `.npz` in the published layout (checked before it is cached)."""
    return download_to_cache(
        url,
        validate=validate_bit_npz,
        offline_hint="To convert a copy obtained elsewhere: `bit-convert /path/to/file.npz --output DIR`.",
        local_files_only=local_files_only,
    )


__all__ = [
    "BIT_WEIGHTS_URL_ENV",
    "DEFAULT_BIT_WEIGHTS_URL",
    "ILSVRC2012_FINETUNED_RESOLUTION",
    "PUBLISHED_CHECKPOINTS",
    "PUBLISHED_CHECKPOINT_NAMES",
    "UPSTREAM_RESOLUTION",
    "PublishedCheckpoint",
    "download_npz_url",
    "download_published",
    "find_published_checkpoint",
    "published_names_help",
]
