"""Reading one image cell of a `datasets` table: a path, encoded bytes, a PIL image, or a {bytes, path} dict.

Every reader of images in this project goes through `read_image`, which decodes with
`modeling_bit.load_rgb_image` (EXIF orientation, palette, RGBA, CMYK and 16-bit images handled) and raises
`UnreadableImage`, carrying the image's name, for anything that cannot be used. The name is the file path
when the cell has one; encoded bytes without a path are named by a digest of their content, so the same
image has the same name in every split, process, worker and epoch (see `image_data.unreadable`).
"""

from __future__ import annotations

import hashlib
import io
import os

from PIL import Image

from modeling_bit import load_rgb_image
from modeling_bit.image_processing_bit import UnreadableImageError

EMPTY_CELL_NAME = "<empty image cell>"


class UnreadableImage(UnreadableImageError):
    """An image cell that cannot be decoded; `name` says which image (a path, or a digest of its bytes)."""

    def __init__(self, name: str, reason: str):
        super().__init__(reason)
        self.name = name


def content_digest(data: bytes) -> str:
    """A short, stable digest of encoded image bytes (names and fingerprints of images without a path)."""
    return hashlib.blake2b(bytes(data), digest_size=8).hexdigest()


def image_source(cell) -> str | os.PathLike | bytes | Image.Image:
    """What `load_rgb_image` reads from a cell: its encoded bytes when it has some, else its path."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        return cell.get("path") or b""
    if isinstance(cell, bytearray):
        return bytes(cell)
    return cell if cell is not None else b""


def image_name(cell, index: int | None = None) -> str:
    """How reports name the image of a cell: its path; else a digest of its bytes (the same image has the same
    name everywhere); else, for a cell holding nothing, `example {index}` when the caller knows the index."""
    path = cell.get("path") if isinstance(cell, dict) else None
    if isinstance(cell, (str, os.PathLike)):
        path = os.fspath(cell)
    if path:
        return str(path)
    data = image_source(cell)
    if isinstance(data, bytes) and data:
        return f"<image bytes {content_digest(data)}>"
    if isinstance(data, Image.Image):
        return getattr(data, "filename", "") or "<PIL image>"
    return f"example {index}" if index is not None else EMPTY_CELL_NAME


def image_fingerprint(cell) -> str:
    """An identity of the image a cell holds: a digest of its bytes, or of its path when it has no bytes."""
    source = image_source(cell)
    data = source if isinstance(source, bytes) else image_name(cell).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_image(cell, index: int | None = None) -> Image.Image:
    """The cell's image as upright 8-bit RGB, fully decoded; `UnreadableImage` (naming it) if it cannot be used."""
    source = image_source(cell)
    if isinstance(source, bytes) and not source:
        raise UnreadableImage(image_name(cell, index), f"{image_name(cell, index)}: no image data")
    if not isinstance(source, (str, os.PathLike, bytes, Image.Image)):
        name = image_name(cell, index)
        raise UnreadableImage(name, f"{name}: a {type(cell).__name__} cell is not an image")
    try:
        return load_rgb_image(source)
    except UnreadableImageError as error:
        raise UnreadableImage(image_name(cell, index), str(error)) from error


def image_area(cell) -> int | None:
    """width x height from the file header (no pixel decoded), or None if it is not a readable image."""
    source = image_source(cell)
    try:
        if isinstance(source, Image.Image):
            width, height = source.size
        else:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                width, height = image.size
    except Exception:  # unreadable files are counted when they are decoded; here they just do not vote
        return None
    return width * height
