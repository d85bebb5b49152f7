"""The similarity threshold, calibrated on the images at hand with planted near-duplicates.

The right threshold depends on the feature model (how far apart its features put distinct photos), so bit-dedup
measures it instead of assuming one: from a sample of the downstream images it takes the similarities between
distinct images and sets the threshold just above the level that at most `FALSE_POSITIVE_IMAGE_RATE` of them reach
with their nearest other image. Then it plants near-duplicates of every sampled image — each kind of
`NEAR_DUPLICATE_KINDS`: resized, re-compressed, cropped (centrally, and off-centre), flipped, colour-shifted — and
reports the share of each kind at or above the threshold (its recall). The threshold is chosen from the distinct
pairs alone, so the recall measured on the planted copies is not fitted to them. Similarities are the search's:
the highest over the two images' views (`dedup.features`), so the threshold accounts for the views too. The
central crop is the same window as the default crop view: its recall shows that the views work, and the
off-centre crop, a window no view has, shows what framing the features tolerate beyond them.

The false-positive rate is per image (how many distinct images would be flagged against a set of the sample's
size): against an upstream set far larger than the sample, more distinct images find a close neighbour, so the
rate there is higher; per pair it is far lower (both are reported).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from modeling_bit import load_rgb_image
from modeling_bit.image_processing_bit import UnreadableImageError

from .errors import DedupInputError
from .features import FeatureModel, crop_window
from .sources import ImageSource

# The planted near-duplicates, each a common way an image is copied around the web.
RESIZE_FACTOR = 0.5  # both sides halved
JPEG_QUALITY = 30  # re-encoded as a low-quality JPEG
CROP_SIDE_FRACTION = 0.8  # 80% of each side (64% of the area): centrally, or at the top-left corner
COLOUR_GAINS = (1.15, 1.0, 0.85)  # warmer: red up, blue down ...
COLOUR_OFFSET = 10  # ... and brighter


def resized(image: Image.Image) -> Image.Image:
    size = (max(1, round(image.width * RESIZE_FACTOR)), max(1, round(image.height * RESIZE_FACTOR)))
    return image.resize(size, Image.BICUBIC)


def recompressed(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return load_rgb_image(buffer.getvalue())


def cropped(image: Image.Image) -> Image.Image:
    return crop_window(image, CROP_SIDE_FRACTION)


def cropped_off_centre(image: Image.Image) -> Image.Image:
    return crop_window(image, CROP_SIDE_FRACTION, left=0, top=0)


def flipped(image: Image.Image) -> Image.Image:
    return image.transpose(Image.FLIP_LEFT_RIGHT)


def colour_shifted(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float32) * np.asarray(COLOUR_GAINS, dtype=np.float32) + COLOUR_OFFSET
    return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8))


NEAR_DUPLICATE_KINDS = {
    "resized": resized,
    "recompressed": recompressed,
    "cropped": cropped,
    "cropped-off-centre": cropped_off_centre,
    "flipped": flipped,
    "colour-shifted": colour_shifted,
}
# Sampled downstream images (fewer when the set is smaller); below the minimum the threshold must be given.
CALIBRATION_IMAGES = 200
MIN_CALIBRATION_IMAGES = 20
# At most this share of distinct images may have another distinct image at or above the threshold.
FALSE_POSITIVE_IMAGE_RATE = 0.01
CALIBRATION_SEED = 0


@dataclasses.dataclass
class Measurement:
    """Recall per planted kind and false-positive rates at `threshold`, on `images` distinct images."""

    threshold: float
    images: int
    recall: dict[str, float]
    false_positive_image_rate: float
    false_positive_pair_rate: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        recall = ", ".join(f"{kind} {value:.0%}" for kind, value in self.recall.items())
        return (
            f"threshold {self.threshold:.4f} on {self.images} distinct images: recall {recall}; false positives "
            f"{self.false_positive_image_rate:.1%} of images, {self.false_positive_pair_rate:.3%} of pairs"
        )


def sample_images(source: ImageSource, count: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED) -> list:
    """Up to `count` readable images of `source` (a seeded random sample; a stream's first ones), decoded."""
    length = source.length()
    if length is None or getattr(source, "streaming", False):
        items = source.items()
    else:
        items = (source.item_at(int(index)) for index in np.random.default_rng(seed).permutation(length))
    images = []
    for item in items:
        try:
            images.append(load_rgb_image(item.source))
        except (UnreadableImageError, OSError):
            continue
        if len(images) == count:
            break
    return images


def similarity_matrix(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(n, m) similarities of (n, views, d) and (m, views, d) features: the highest over their views, as the
    search computes them."""
    return np.einsum("ivd,jwd->ijvw", first, second).max(axis=(2, 3))


def nearest_distinct(features: np.ndarray) -> np.ndarray:
    """Each image's highest similarity to another image."""
    similarities = similarity_matrix(features, features)
    np.fill_diagonal(similarities, -np.inf)
    return similarities.max(axis=1)


def threshold_from_distinct(features: np.ndarray, rate: float = FALSE_POSITIVE_IMAGE_RATE) -> float:
    """The lowest threshold at which at most `rate` of the images have another image at or above it."""
    nearest = np.sort(nearest_distinct(features))[::-1]
    allowed = int(np.floor(rate * len(nearest)))
    return float(np.nextafter(np.float32(nearest[allowed]), np.float32(np.inf)))


def measure(model: FeatureModel, images: list, threshold: float, originals: np.ndarray | None = None) -> Measurement:
    """Recall of each planted kind and the false-positive rates at `threshold`, on distinct `images`."""
    if originals is None:
        originals = model.features_of_images(images)
    recall = {}
    for kind, plant in NEAR_DUPLICATE_KINDS.items():
        copies = model.features_of_images([plant(image) for image in images])
        pair_similarities = np.einsum("ivd,iwd->ivw", originals, copies).max(axis=(1, 2))
        recall[kind] = float(np.mean(pair_similarities >= threshold))
    similarities = similarity_matrix(originals, originals)
    upper = similarities[np.triu_indices(len(originals), 1)]
    return Measurement(
        threshold=threshold,
        images=len(images),
        recall=recall,
        false_positive_image_rate=float(np.mean(nearest_distinct(originals) >= threshold)),
        false_positive_pair_rate=float(np.mean(upper >= threshold)) if len(upper) else 0.0,
    )


def calibrate(model: FeatureModel, images: list) -> Measurement:
    """The threshold for `model` on these (distinct) images, with the recall it gets on planted near-duplicates."""
    if len(images) < MIN_CALIBRATION_IMAGES:
        raise DedupInputError(
            f"Calibrating the threshold needs at least {MIN_CALIBRATION_IMAGES} readable downstream images; there are "
            f"{len(images)}. Pass --threshold T (a cosine similarity, e.g. from a calibration on a larger set)."
        )
    originals = model.features_of_images(images)
    return measure(model, images, threshold_from_distinct(originals), originals)
