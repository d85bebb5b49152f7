"""A procedurally generated upstream dataset: many classes of stroke glyphs, no network, no downloads.

Each class is a random glyph, a few pen strokes (straight segments, Bezier curves, ellipse arcs, dots)
fixed by (seed, class id). Each example draws its class's glyph again as a person would write it: the
control points wobble, and the whole glyph is rotated, sheared, scaled and moved; the pen width, ink and
paper colours (either polarity, often grey), background texture, blur and rendering resolution vary
(some examples are drawn on a coarse grid and upsampled, as low-resolution scans are). Telling a thousand
such glyphs apart needs stroke, junction, curvature and layout features, which is what recognising
handwriting or other line drawings needs downstream, without using any real downstream data.

    python -m pretraining.synthetic --output-dir DIR [--num-classes 1000] [--examples-per-class 64]

writes `DIR/train-NNNNN-of-NNNNN.parquet` shards (columns `image` {bytes, path} PNG and `label`
ClassLabel), which `pretrain.py --dataset DIR` reads (with or without --streaming); `--format imagefolder`
writes `DIR/<class>/<n>.png` for `--train-dir` instead.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from modeling_bit.file_utils import atomic_write_bytes

SUPERSAMPLING = 4  # strokes are drawn at 4x and downsampled: anti-aliased edges at every pen width


@dataclasses.dataclass(frozen=True)
class GlyphStyle:
    """Ranges the per-example rendering draws from (a fraction of the image size unless said otherwise)."""

    strokes: tuple[int, int] = (2, 4)
    point_jitter: float = 0.05  # wobble of each control point
    rotation_degrees: float = 18.0
    shear: float = 0.25
    scale: tuple[float, float] = (0.65, 1.05)
    shift: float = 0.12
    pen_width: tuple[float, float] = (0.06, 0.2)
    coarse_grid_probability: float = 0.5  # drawn at 7-16 px, then upsampled bilinearly
    coarse_grid_sizes: tuple[int, int] = (7, 16)
    blur_probability: float = 0.3
    noise_probability: float = 0.5
    grey_probability: float = 0.6


def glyph_strokes(rng: np.random.Generator, style: GlyphStyle) -> list[tuple[str, np.ndarray]]:
    """A class's glyph: (kind, control points in [0, 1]^2) per stroke."""
    strokes = []
    for _ in range(int(rng.integers(style.strokes[0], style.strokes[1] + 1))):
        kind = rng.choice(["line", "curve", "curve", "arc", "dot"], p=[0.3, 0.2, 0.2, 0.22, 0.08])
        if kind == "line":
            points = rng.uniform(0.15, 0.85, size=(2, 2))
        elif kind == "curve":
            points = rng.uniform(0.1, 0.9, size=(3, 2))
        elif kind == "arc":
            centre = rng.uniform(0.3, 0.7, size=2)
            radii = rng.uniform(0.12, 0.35, size=2)
            start = rng.uniform(0, 2 * math.pi)
            sweep = rng.uniform(0.6, 2.0) * math.pi
            points = np.array([centre, radii, [start, start + sweep]])
        else:
            points = rng.uniform(0.2, 0.8, size=(1, 2))
        strokes.append((str(kind), points))
    return strokes


def _polyline(kind: str, points: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Points along a stroke (unit square), with the control points wobbled for this example."""
    if kind == "arc":
        centre = points[0] + rng.normal(0, jitter, 2)
        radii = points[1] * rng.uniform(0.85, 1.15, 2)
        angles = np.linspace(*(points[2] + rng.normal(0, 0.15, 2)), 24)
        return centre + radii * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    wobbled = points + rng.normal(0, jitter, points.shape)
    if kind == "curve":
        t = np.linspace(0, 1, 20)[:, None]
        return (1 - t) ** 2 * wobbled[0] + 2 * (1 - t) * t * wobbled[1] + t**2 * wobbled[2]
    return wobbled


def _affine(rng: np.random.Generator, style: GlyphStyle) -> np.ndarray:
    angle = math.radians(rng.uniform(-style.rotation_degrees, style.rotation_degrees))
    scale = rng.uniform(*style.scale)
    shear = rng.uniform(-style.shear, style.shear)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    matrix = scale * rotation @ np.array([[1.0, shear], [0.0, 1.0]])
    shift = rng.uniform(-style.shift, style.shift, 2)
    return np.concatenate([matrix, (0.5 + shift - matrix @ np.array([0.5, 0.5]))[:, None]], axis=1)


def _colours(rng: np.random.Generator, style: GlyphStyle) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if rng.random() < style.grey_probability:
        ink, paper = rng.uniform(0, 90), rng.uniform(165, 255)
        ink, paper = (ink, paper) if rng.random() < 0.5 else (paper, ink)
        return (int(ink),) * 3, (int(paper),) * 3
    while True:
        ink, paper = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(float(ink.mean()) - float(paper.mean())) > 70:
            return tuple(int(v) for v in ink), tuple(int(v) for v in paper)


def render_glyph(strokes, rng: np.random.Generator, size: int, style: GlyphStyle = GlyphStyle()) -> Image.Image:
    """One handwritten-looking RGB example of a glyph, `size` x `size` pixels."""
    coarse = rng.random() < style.coarse_grid_probability
    canvas = int(rng.integers(style.coarse_grid_sizes[0], style.coarse_grid_sizes[1] + 1)) if coarse else size
    ink, paper = _colours(rng, style)
    scale = canvas * SUPERSAMPLING
    image = Image.new("RGB", (scale, scale), paper)
    draw = ImageDraw.Draw(image)
    affine = _affine(rng, style)
    width = max(1, round(rng.uniform(*style.pen_width) * scale))
    for kind, points in strokes:
        line = _polyline(kind, points, rng, style.point_jitter)
        line = (np.concatenate([line, np.ones((len(line), 1))], axis=1) @ affine.T) * scale
        if kind == "dot":
            x, y = line[0]
            radius = width * 0.8
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=ink)
        else:
            draw.line([tuple(p) for p in line], fill=ink, width=width, joint="curve")
    image = image.resize((canvas, canvas), Image.Resampling.BOX)
    if rng.random() < style.noise_probability:
        pixels = np.asarray(image, dtype=np.float32)
        gradient = np.linspace(-1, 1, canvas)[None, :, None] * rng.uniform(-30, 30)
        pixels = pixels + gradient + rng.normal(0, rng.uniform(3, 18), pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if canvas != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < style.blur_probability:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2) * size / 32))
    return image


def class_name(label: int) -> str:
    return f"glyph-{label:04d}"


def generate_examples(
    num_classes: int, examples_per_class: int, image_size: int, seed: int
) -> Iterator[tuple[bytes, int]]:
    """(PNG bytes, label), class-major; every example is fixed by (seed, class, index)."""
    style = GlyphStyle()
    for label in range(num_classes):
        strokes = glyph_strokes(np.random.default_rng([seed, label]), style)
        for index in range(examples_per_class):
            image = render_glyph(strokes, np.random.default_rng([seed, label, index + 1]), image_size, style)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", optimize=False, compress_level=1)
            yield buffer.getvalue(), label


def write_dataset(
    output_dir: str | Path,
    num_classes: int = 1000,
    examples_per_class: int = 64,
    image_size: int = 40,
    seed: int = 0,
    num_shards: int = 8,
    format: str = "parquet",
) -> Path:
    """Write the dataset; shards are written atomically and examples shuffled across them (seeded)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    total = num_classes * examples_per_class
    examples = tqdm(
        generate_examples(num_classes, examples_per_class, image_size, seed), total=total, desc="rendering glyphs"
    )
    if format == "imagefolder":
        counts = {}
        for png, label in examples:
            counts[label] = counts.get(label, 0) + 1
            atomic_write_bytes(output_dir / class_name(label) / f"{counts[label] - 1:05d}.png", png)
        return output_dir
    rows = list(examples)
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(len(rows))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[class_name(label) for label in range(num_classes)]),
        }
    )
    for shard, indices in enumerate(np.array_split(order, num_shards)):
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": rows[i][0], "path": None} for i in indices], "label": [rows[i][1] for i in indices]},
            features=features,
        )
        buffer = io.BytesIO()
        table.to_parquet(buffer)
        atomic_write_bytes(output_dir / f"train-{shard:05d}-of-{num_shards:05d}.parquet", buffer.getvalue())
    return output_dir


@dataclasses.dataclass
class SyntheticArguments:
    output_dir: str = dataclasses.field(metadata={"help": "Where to write the shards (or class folders)."})
    num_classes: int = 1000
    examples_per_class: int = 64
    image_size: int = 40
    seed: int = 0
    num_shards: int = 8
    format: Literal["parquet", "imagefolder"] = "parquet"


def main(argv: list[str] | None = None) -> Path:
    (args,) = HfArgumentParser(SyntheticArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    if args.num_classes < 2 or args.examples_per_class < 1 or args.image_size < 8 or args.num_shards < 1:
        raise ValueError(
            "Need --num-classes >= 2, --examples-per-class >= 1, --image-size >= 8 and --num-shards >= 1."
        )
    path = write_dataset(
        args.output_dir,
        args.num_classes,
        args.examples_per_class,
        args.image_size,
        args.seed,
        args.num_shards,
        args.format,
    )
    print(f"Wrote {args.num_classes * args.examples_per_class} examples of {args.num_classes} glyph classes to {path}")
    return path


if __name__ == "__main__":
    main()
