"""Features for near-duplicate search: L2-normalised pre-logits of a BiT model, cached per source and model.

The feature of an image is BitModel's pooler output (the pre-logits: final GroupNorm, ReLU, global average
pooling; docs/recipe.md "Architecture", "Head") of the image resized to the model's square resolution with the BiT
preprocessing, divided by its L2 norm, so that a dot product is the cosine similarity. With `flip_invariant` (the
default) it is the normalised sum of the pre-logits of the image and of its mirror image: a horizontally flipped
copy then has exactly the same feature, at twice the forward cost (decoding, which dominates on an accelerator,
is paid once).

A pre-logit feature changes with the framing (a copy cropped to 64% of the area is as far from its original as a
distinct photo is, for the embedded bit-tiny; README "Measured on real photos"), so every image has views: the
whole image and its central crops (`crop_views`, side fractions; default `DEFAULT_CROP_VIEWS`), each a feature.
The similarity of two images is the highest over their views, so a copy cropped to about a view's window matches
in either direction (a downstream image that is a crop of an upstream one, and the reverse). Each view costs one
more feature of every image, upstream included.

Images are decoded (`modeling_bit.load_rgb_image`) and resized in worker processes, in the source's order;
unreadable ones are skipped and counted. Features are written in shards of `SHARD_SIZE` source items, each shard
atomically (write, then rename) into a folder named by the model, the preprocessing and the source's
fingerprint: a second run reads them instead of computing them, and an interrupted run continues after its last
complete shard (a stream is skipped forward, not decoded again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from finetune.errors import FinetuneInputError
from finetune.models import LOADING_ERRORS, checkpoint_config, resolve_model_name
from finetune.preprocessing import resize_to_square
from finetune.progress import transformers_quiet
from modeling_bit import BitModel, bit_image_processor, load_rgb_image
from modeling_bit.file_utils import atomic_write_bytes, atomic_write_json
from modeling_bit.folder_layout import WEIGHTS_FILE, folder_resolution
from modeling_bit.image_processing_bit import UnreadableImageError

from .errors import DedupInputError
from .sources import ImageItem, ImageSource

logger = logging.getLogger(__name__)

# The default feature model: the published BiT-M-R50x1 (ImageNet-21k upstream), by name.
DEFAULT_MODEL = "BiT-M-R50x1"
# Resolution for a model folder that names none (the standard upstream resolution of the published models).
DEFAULT_RESOLUTION = 224
# Source items per cached shard, and images per forward pass.
SHARD_SIZE = 4096
DEFAULT_BATCH_SIZE = 64
# Central crops (side fractions) indexed besides the whole image: the central 80% of each side, the usual crop of a
# web copy that keeps the subject (thumbnails, trimmed borders).
DEFAULT_CROP_VIEWS = (0.8,)
# Bump when the meaning of a cached feature changes, so old caches are not read.
FEATURE_FORMAT_VERSION = 2
COMPLETE_FILE = "complete.json"


def default_cache_dir() -> Path:
    """`<HF_HOME>/assets/bit-transfer/dedup/features` (huggingface_hub's assets cache)."""
    from huggingface_hub import cached_assets_path, constants

    return cached_assets_path("bit-transfer", "dedup", "features", assets_dir=constants.HF_ASSETS_CACHE)


def crop_window(image: Image.Image, side_fraction: float, left: float = 0.5, top: float = 0.5) -> Image.Image:
    """The window of `side_fraction` of each side of `image`, placed at `left` / `top` in [0, 1] of the room left
    (0.5, 0.5: central; 0, 0: the top-left corner)."""
    width = max(1, round(image.width * side_fraction))
    height = max(1, round(image.height * side_fraction))
    x, y = round((image.width - width) * left), round((image.height - height) * top)
    return image.crop((x, y, x + width, y + height))


def image_views(image: Image.Image, crop_views: Sequence[float]) -> list[Image.Image]:
    """The whole image, then its central crops at each side fraction of `crop_views`."""
    return [image, *(crop_window(image, fraction) for fraction in crop_views)]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclasses.dataclass
class FeatureModel:
    """A BiT backbone that turns images into L2-normalised pre-logit features."""

    name: str  # as given
    source: str  # where it was loaded from
    model: BitModel
    resolution: int
    flip_invariant: bool
    device: torch.device
    crop_views: tuple[float, ...] = DEFAULT_CROP_VIEWS

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_sizes[-1])

    @property
    def views(self) -> int:
        """Features per image: the whole image and each crop view."""
        return 1 + len(self.crop_views)

    def identity(self) -> dict:
        """What the features depend on (names the cache): the weights, the resolution, the views."""
        weights = Path(self.source) / WEIGHTS_FILE
        stat = weights.stat() if weights.is_file() else None
        return {
            "model": str(Path(self.source).resolve()) if Path(self.source).exists() else self.source,
            "weights": [stat.st_size, stat.st_mtime_ns] if stat else None,
            "resolution": self.resolution,
            "flip_invariant": self.flip_invariant,
            "crop_views": list(self.crop_views),
            "version": FEATURE_FORMAT_VERSION,
        }

    @torch.inference_mode()
    def features(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(batch, 3, R, R) preprocessed images -> (batch, dim) float32 features of unit L2 norm."""
        pixel_values = pixel_values.to(self.device)
        pooled = self.model(pixel_values=pixel_values).pooler_output.flatten(1).float()
        if self.flip_invariant:
            pooled = pooled + self.model(pixel_values=pixel_values.flip(-1)).pooler_output.flatten(1).float()
        return torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()

    def view_features(self, pixel_values: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """(images, views, 3, R, R) preprocessed views -> (images, views, dim) features, `batch_size` images per
        forward pass."""
        images, views = pixel_values.shape[:2]
        rows = [
            self.features(pixel_values[start : start + batch_size].flatten(0, 1))
            for start in range(0, images, batch_size)
        ]
        features = np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
        return features.reshape(images, views, self.dim)

    def features_of_images(self, images: Sequence[Image.Image], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """(images, views, dim) features of decoded RGB images (the same preprocessing and views as files get)."""
        processor = bit_image_processor(self.resolution)
        rows = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack(
                [
                    view_pixels(image, self.resolution, processor, self.crop_views)
                    for image in images[start : start + batch_size]
                ]
            )
            rows.append(self.view_features(batch, batch_size))
        return np.concatenate(rows) if rows else np.zeros((0, self.views, self.dim), np.float32)


def view_pixels(image: Image.Image, resolution: int, processor, crop_views: Sequence[float]) -> torch.Tensor:
    """(views, 3, R, R): each view of `image` (`image_views`) preprocessed at the model's resolution."""
    return torch.stack([resize_to_square(view, resolution, processor) for view in image_views(image, crop_views)])


def load_feature_model(
    name: str = DEFAULT_MODEL,
    *,
    resolution: int | None = None,
    flip_invariant: bool = True,
    crop_views: Sequence[float] = DEFAULT_CROP_VIEWS,
    device: torch.device | str | None = None,
) -> FeatureModel:
    """The backbone of the BiT checkpoint `name` (a folder, Hub id or published BiT name) as a feature model with
    the given views; a checkpoint that is not BiT, or does not load, and a crop view that is not a fraction in
    (0, 1), are a `DedupInputError`."""
    bad_views = [fraction for fraction in crop_views if not 0 < fraction < 1]
    if bad_views:
        raise DedupInputError(
            f"--crop-views {' '.join(map(str, crop_views))}: expected side fractions in (0, 1), e.g. 0.8 for the "
            "central 80% of each side."
        )
    try:
        source = str(resolve_model_name(str(name)))
    except FinetuneInputError:
        raise
    except (OSError, RuntimeError, ValueError) as error:
        raise DedupInputError(f"--model {name!r}: could not get it ({type(error).__name__}: {error}).") from error
    if checkpoint_config(source) is None:
        raise DedupInputError(
            f"--model {name!r}: expected a BiT checkpoint (a folder saved with save_pretrained, a Hub model id or a "
            "published BiT name such as BiT-M-R50x1); it has no readable config.json."
        )
    try:
        with transformers_quiet(errors_only=True):
            model = BitModel.from_pretrained(source, dtype=torch.float32)
    except LOADING_ERRORS as error:
        raise DedupInputError(f"--model {name!r}: loading failed ({type(error).__name__}: {error}).") from error
    if resolution is None:
        resolution = folder_resolution(source) if Path(source).is_dir() else None
        resolution = resolution or DEFAULT_RESOLUTION
    device = torch.device(device) if device is not None else default_device()
    return FeatureModel(
        str(name), source, model.eval().to(device), int(resolution), flip_invariant, device, tuple(crop_views)
    )


# --- Decoding, in worker processes -------------------------------------------------------------------------

_WORKER_SETTINGS: tuple[int, tuple[float, ...], bool] | None = None  # (resolution, crop_views, with_digests)


def _init_worker(resolution: int, crop_views: tuple[float, ...], with_digests: bool) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = (resolution, crop_views, with_digests)
    torch.set_num_threads(1)


def _decode(item: ImageItem) -> tuple[str, np.ndarray | None, str | None]:
    """(name, (views, 3, R, R) float32 pixels or None when unreadable, SHA-256 of the encoded image or None)."""
    resolution, crop_views, with_digests = _WORKER_SETTINGS
    digest = None
    try:
        data = item.source
        if not isinstance(data, bytes):
            with open(data, "rb") as stream:
                data = stream.read()
        if with_digests:
            digest = hashlib.sha256(data).hexdigest()
        if not data:
            raise UnreadableImageError(f"{item.name}: empty")
        image = load_rgb_image(data)
    except (UnreadableImageError, OSError) as error:
        logger.debug("Skipping unreadable image: %s", error)
        return item.name, None, digest
    return item.name, view_pixels(image, resolution, _processor(resolution), crop_views).numpy(), digest


_PROCESSORS: dict = {}


def _processor(resolution: int):
    if resolution not in _PROCESSORS:
        _PROCESSORS[resolution] = bit_image_processor(resolution)
    return _PROCESSORS[resolution]


def decoded_images(
    items: Iterator[ImageItem], model: FeatureModel, *, num_workers: int, with_digests: bool
) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """`_decode` of every item for `model`, in order, in `num_workers` worker processes (0: in this process)."""
    settings = (model.resolution, model.crop_views, with_digests)
    if num_workers < 1 or "fork" not in multiprocessing.get_all_start_methods():
        _init_worker(*settings)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        yield from map(_decode, items)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(num_workers, initializer=_init_worker, initargs=settings) as pool:
        yield from pool.imap(_decode, items, chunksize=8)


# --- Shards and their cache --------------------------------------------------------------------------------


@dataclasses.dataclass
class FeatureShard:
    """Features of `SHARD_SIZE` consecutive source items (fewer in the last shard); unreadable items have no row."""

    names: list[str]
    features: np.ndarray  # (readable items, views, dim) float32, unit rows
    digests: list[str]  # SHA-256 per readable item, when computed
    unreadable: list[str]

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            names=np.asarray(self.names, dtype=str),
            features=self.features,
            digests=np.asarray(self.digests, dtype=str),
            unreadable=np.asarray(self.unreadable, dtype=str),
        )
        return buffer.getvalue()

    @classmethod
    def read(cls, path: Path) -> FeatureShard:
        with np.load(path, allow_pickle=False) as arrays:
            return cls(
                names=arrays["names"].tolist(),
                features=arrays["features"].astype(np.float32, copy=False),
                digests=arrays["digests"].tolist(),
                unreadable=arrays["unreadable"].tolist(),
            )

    @staticmethod
    def read_names(path: Path) -> list[str]:
        with np.load(path, allow_pickle=False) as arrays:
            return arrays["names"].tolist()


class FeatureCache:
    """The cached shards of one (model, preprocessing, source) triple."""

    def __init__(self, root: str | os.PathLike, model: FeatureModel, source: ImageSource, with_digests: bool):
        identity = {
            **model.identity(),
            "source": source.fingerprint(),
            "shard_size": SHARD_SIZE,
            "digests": with_digests,
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = Path(root) / key
        self.identity = identity

    def shard_path(self, index: int) -> Path:
        return self.folder / f"shard-{index:06d}.npz"

    def cached_shards(self) -> int:
        """How many consecutive shards from the first are complete (a torn write never has its final name)."""
        count = 0
        while self.shard_path(count).is_file():
            count += 1
        return count

    def is_complete(self) -> bool:
        return (self.folder / COMPLETE_FILE).is_file()

    def shard_count(self) -> int | None:
        try:
            return int(json.loads((self.folder / COMPLETE_FILE).read_text())["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def source_features(
    model: FeatureModel,
    source: ImageSource,
    *,
    cache_dir: str | os.PathLike,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    with_digests: bool = False,
    description: str = "Features",
) -> Iterator[FeatureShard]:
    """The source's features, shard by shard in source order: cached shards read, the others computed (and
    cached). Unreadable images are skipped and named in their shard's `unreadable`."""
    cache = FeatureCache(cache_dir, model, source, with_digests)
    cache.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache.folder / "identity.json", cache.identity)
    total = cache.shard_count()
    cached = cache.cached_shards()
    length = source.length()
    with tqdm(total=length, desc=description, unit="img", dynamic_ncols=True) as progress:
        for index in range(cached):
            shard = FeatureShard.read(cache.shard_path(index))
            progress.update(len(shard.names) + len(shard.unreadable))
            yield shard
        if total is not None and cached >= total:
            return
        start = cached * SHARD_SIZE
        decoded = decoded_images(source.items(start), model, num_workers=num_workers, with_digests=with_digests)
        index = cached
        while True:
            shard = _compute_shard(model, decoded, batch_size, progress)
            if shard is None:
                break
            atomic_write_bytes(cache.shard_path(index), shard.to_bytes())
            index += 1
            yield shard
            if len(shard.names) + len(shard.unreadable) < SHARD_SIZE:
                break
        atomic_write_json(cache.folder / COMPLETE_FILE, {"shards": index})


def _compute_shard(model: FeatureModel, decoded: Iterator, batch_size: int, progress) -> FeatureShard | None:
    """The next shard from the decoded stream, or None when it is exhausted."""
    names, digests, unreadable, rows, batch = [], [], [], [], []
    seen = pending = 0
    for name, pixels, digest in decoded:
        seen += 1
        pending += 1
        if pixels is None:
            unreadable.append(name)
        else:
            names.append(name)
            digests.append(digest or "")
            batch.append(pixels)
        if len(batch) == batch_size or seen == SHARD_SIZE:
            if batch:
                rows.append(model.view_features(torch.from_numpy(np.stack(batch)), batch_size))
                batch.clear()
            progress.update(pending)
            pending = 0
        if seen == SHARD_SIZE:
            break
    if seen == 0:
        return None
    if batch:
        rows.append(model.view_features(torch.from_numpy(np.stack(batch)), batch_size))
    progress.update(pending)
    features = np.concatenate(rows) if rows else np.zeros((0, model.views, model.dim), np.float32)
    return FeatureShard(names, features, digests, unreadable)
