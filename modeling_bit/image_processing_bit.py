"""BiT preprocessing, defined once: decode to RGB, resize to a fixed square, scale to [-1, 1].

docs/recipe.md ("Architecture"): input is RGB scaled to [-1, 1] (mean 0.5, std 0.5 per channel); test-time
preprocessing is a plain resize to a fixed square, no center crop (paper §2.2). `bit_image_processor` returns stock
transformers' BiT image processor configured that way, so the `preprocessor_config.json` it saves is read by stock
`AutoImageProcessor` (and the Hub widget) and preprocesses exactly as our training and evaluation do. Training
transforms resize with the same processor (to the pre-crop size) and then crop and flip.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_utils import PILImageResampling
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

BIT_IMAGE_MEAN = (0.5, 0.5, 0.5)
BIT_IMAGE_STD = (0.5, 0.5, 0.5)
# Resize filter of the released BiT input pipelines (tf.image.resize and torchvision Resize default).
BIT_RESAMPLE = PILImageResampling.BILINEAR
DEFAULT_RESOLUTION = 224


def bit_image_processor(resolution: int = DEFAULT_RESOLUTION) -> BitImageProcessorPil:
    """The BiT image processor at `resolution`: RGB, resize to resolution x resolution, scale to [-1, 1]."""
    if int(resolution) < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution!r}.")
    return BitImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"height": int(resolution), "width": int(resolution)},
        resample=BIT_RESAMPLE,
        do_center_crop=False,
        # Unused (no center crop), but written to preprocessor_config.json: say the input size, not 224.
        crop_size={"height": int(resolution), "width": int(resolution)},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(BIT_IMAGE_MEAN),
        image_std=list(BIT_IMAGE_STD),
    )


class UnreadableImageError(ValueError):
    """An image file that cannot be used: empty, corrupt, not an image, or decompression-bomb sized."""


_HIGH_BIT_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, upright.

    EXIF orientation is applied; transparency is composited on white (as transformers' `convert_rgb`
    does); 16-bit and 32-bit integer images are scaled down to 8 bits rather than clipped; palette,
    grayscale and CMYK images are converted.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values / 257.0, 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb_image(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """Decode a path, encoded bytes or PIL image to upright 8-bit RGB, fully loaded.

    Raises `UnreadableImageError` (with the reason) for empty, truncated, corrupt or non-image data and
    for images larger than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`).
    """
    name = source if isinstance(source, (str, os.PathLike)) else "<image bytes>"
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                image = source
            elif isinstance(source, (bytes, bytearray)):
                image = Image.open(io.BytesIO(source))
            else:
                if os.path.getsize(source) == 0:
                    raise UnreadableImageError(f"{name}: empty file")
                image = Image.open(source)
            image.load()
            return to_rgb(image)
    except UnreadableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImageError(f"{name}: refused, too many pixels ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(f"{name}: not a readable image ({error})") from error
