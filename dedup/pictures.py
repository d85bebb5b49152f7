"""A picture of found pairs, as the paper's Appendix D (Fig. 10): each downstream image beside its upstream match.

Drawn with PIL alone. With many pairs, the most similar half and the least similar half above the threshold
are shown: the borderline pairs are where a wrong threshold shows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw, ImageOps

from modeling_bit import load_rgb_image
from modeling_bit.file_utils import atomic_write_bytes
from modeling_bit.image_processing_bit import UnreadableImageError

THUMBNAIL = 112
CAPTION = 28
COLUMNS = 4  # pairs per row
MAX_PAIRS_SHOWN = 32
BACKGROUND = (255, 255, 255)
BORDER = (40, 120, 40)


def shown_pairs(pairs: Sequence, limit: int = MAX_PAIRS_SHOWN) -> list:
    """All pairs when few; else the most and the least similar ones, most similar first."""
    ordered = sorted(pairs, key=lambda pair: -pair.similarity)
    if len(ordered) <= limit:
        return ordered
    return ordered[: limit // 2] + ordered[-(limit - limit // 2) :]


def _thumbnail(source) -> Image.Image:
    try:
        image = load_rgb_image(source)
    except (UnreadableImageError, OSError):
        return Image.new("RGB", (THUMBNAIL, THUMBNAIL), (200, 200, 200))
    return ImageOps.pad(image, (THUMBNAIL, THUMBNAIL), color=BACKGROUND)


def draw_pairs(
    pairs: Sequence, downstream_image: Callable[[str], object], upstream_image: Callable[[str], object]
) -> Image.Image:
    """A grid of (downstream | upstream) thumbnails captioned with their similarity and names."""
    rows = (len(pairs) + COLUMNS - 1) // COLUMNS
    cell_width, cell_height = 2 * THUMBNAIL + 12, THUMBNAIL + CAPTION + 8
    canvas = Image.new("RGB", (COLUMNS * cell_width, max(1, rows) * cell_height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for position, pair in enumerate(pairs):
        left, top = (position % COLUMNS) * cell_width + 4, (position // COLUMNS) * cell_height + 4
        canvas.paste(_thumbnail(downstream_image(pair.downstream)), (left, top))
        canvas.paste(_thumbnail(upstream_image(pair.upstream)), (left + THUMBNAIL + 4, top))
        draw.rectangle((left - 2, top - 2, left + 2 * THUMBNAIL + 6, top + THUMBNAIL + 1), outline=BORDER, width=2)
        draw.text((left, top + THUMBNAIL + 3), f"{pair.similarity:.4f}", fill=(0, 0, 0))
        names = f"{os.path.basename(pair.downstream)[:16]} | {os.path.basename(pair.upstream)[:16]}"
        draw.text((left, top + THUMBNAIL + 15), names, fill=(90, 90, 90))
    return canvas


def save_pairs_picture(path, pairs: Sequence, downstream_image, upstream_image) -> None:
    import io

    buffer = io.BytesIO()
    draw_pairs(shown_pairs(pairs), downstream_image, upstream_image).save(buffer, "PNG")
    atomic_write_bytes(path, buffer.getvalue())
