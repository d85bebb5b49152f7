"""Example images for the Hub inference widget, shipped inside the repository folder.

They are synthetic test patterns drawn here, pixel by pixel: no third-party photo (and no licence question) goes
into a published repository. A test pattern shows that the widget runs and what the model's output looks like;
it says nothing about accuracy, and the card says so. Users try their own photos in the widget.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_bit.file_utils import atomic_write_bytes

EXAMPLES_DIR = "examples"
EXAMPLE_SIZE = 256


@dataclass(frozen=True)
class ExampleImage:
    file: str  # path inside the folder, "/"-separated as in a Hub repository
    title: str


def _colour_bars() -> np.ndarray:
    # The seven 75% colour bars of a classic broadcast test card, left to right.
    colours = np.array(
        [[191, 191, 191], [191, 191, 0], [0, 191, 191], [0, 191, 0], [191, 0, 191], [191, 0, 0], [0, 0, 191]],
        dtype=np.uint8,
    )
    columns = np.arange(EXAMPLE_SIZE) * len(colours) // EXAMPLE_SIZE
    return np.broadcast_to(colours[columns][None], (EXAMPLE_SIZE, EXAMPLE_SIZE, 3)).copy()


def _checkerboard() -> np.ndarray:
    squares = 8
    cells = np.arange(EXAMPLE_SIZE) * squares // EXAMPLE_SIZE
    light = (cells[:, None] + cells[None, :]) % 2 == 0
    return np.where(light[..., None], np.uint8(235), np.uint8(20)).repeat(3, axis=2).astype(np.uint8)


def _rings() -> np.ndarray:
    y, x = np.mgrid[0:EXAMPLE_SIZE, 0:EXAMPLE_SIZE] - (EXAMPLE_SIZE - 1) / 2
    radius = np.hypot(x, y)
    wave = (np.cos(radius / 6.0) + 1) / 2  # rings about 38 pixels apart
    image = np.stack([wave * 230 + 20, wave * 120 + 60, (1 - wave) * 200 + 40], axis=-1)
    return np.round(image).astype(np.uint8)


_PATTERNS = (
    ("colour-bars.png", "Synthetic test pattern: colour bars", _colour_bars),
    ("checkerboard.png", "Synthetic test pattern: checkerboard", _checkerboard),
    ("rings.png", "Synthetic test pattern: concentric rings", _rings),
)


def example_images() -> list[ExampleImage]:
    """The test patterns `write_example_images` writes, as the card lists them."""
    return [ExampleImage(f"{EXAMPLES_DIR}/{name}", title) for name, title, _ in _PATTERNS]


def write_example_images(folder: str | Path) -> None:
    """Write the test patterns into `folder/examples/` (same bytes every time; unchanged files are not rewritten)."""
    folder = Path(folder)
    for name, _, draw in _PATTERNS:
        buffer = io.BytesIO()
        Image.fromarray(draw(), mode="RGB").save(buffer, format="PNG")
        path = folder / EXAMPLES_DIR / name
        if not path.is_file() or path.read_bytes() != buffer.getvalue():
            atomic_write_bytes(path, buffer.getvalue())


def shipped_example_images(folder: str | Path) -> list[ExampleImage]:
    """The test patterns already present in `folder` (written by `write_example_images`)."""
    folder = Path(folder)
    return [
        ExampleImage(f"{EXAMPLES_DIR}/{name}", title)
        for name, title, _ in _PATTERNS
        if (folder / EXAMPLES_DIR / name).is_file()
    ]


__all__ = ["EXAMPLES_DIR", "ExampleImage", "example_images", "shipped_example_images", "write_example_images"]
