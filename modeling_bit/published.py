"""The published BiT checkpoints, and loading them by name.

The catalog lists every checkpoint Google released as a `.npz` in the published layout (BIT_RECIPE.md
"Published checkpoints"; file names from the big_transfer README, github.com/google-research/big_transfer):

- `BiT-{S,M}-R{50x1,50x3,101x1,101x3,152x2,152x4}`: upstream BiT-S (ILSVRC-2012, 1,000-class head) and BiT-M
  (ImageNet-21k, 21,843-class head), at `<base>/<name>.npz`;
- `BiT-M-R{...}-ILSVRC2012`: BiT-M fine-tuned on ILSVRC-2012 (1,000 classes), at `<base>/<name>.npz`;
- the R50x1 students distilled from BiT-M-R152x2 ("Knowledge distillation: A good teacher is patient and
  consistent", Beyer et al. 2021) at 224 and 160 pixels, and their two R152x2 teachers (ILSVRC-2012 heads),
  at `<base>/distill/R50x1_224.npz`, ... We name them `BiT-R50x1-distilled-224`, `BiT-M-R152x2-teacher-384`, ...;
  the file path without `.npz` (`distill/R50x1_224`) is accepted too.

`<base>` is `$BIT_WEIGHTS_URL`, by default https://storage.googleapis.com/bit_models.

`resolve_pretrained_name` is what `from_pretrained("bit-m-r101x3")` goes through: a local folder or a Hub
repository of that name wins; otherwise a published name is downloaded, converted and cached once
(`<HF assets cache>/bit-transfer/bit_models/converted/<hash of the URL>/<name>`), and that folder is loaded.
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import WeakFileLock, httpx

from . import labels
from .configuration_bit import (
    ILSVRC2012_NUM_CLASSES,
    IMAGENET21K_NUM_CLASSES,
    PUBLISHED_ARCHITECTURES,
    RESNET_DEPTHS,
)
from .download import cache_folder, download_to_cache, url_digest

logger = logging.getLogger(__name__)

BIT_WEIGHTS_URL_ENV = "BIT_WEIGHTS_URL"
DEFAULT_BIT_WEIGHTS_URL = "https://storage.googleapis.com/bit_models"

# Input resolution written to a converted folder's preprocessor_config.json: the square size its head was
# trained (or fine-tuned) to see, so that the folder works as it is, e.g. in a pipeline.
# - Upstream BiT-S/M heads: 224, the standard ImageNet training resolution (the paper does not state the upstream
#   one; timm's configs for these very files, `resnetv2_*_bit.goog_in21k`, use 224). The BiT-HyperRule's 448/384
#   (paper) or 512/480 (released code) are fine-tuning settings, picked by the fine-tuning job from the task's
#   images, not properties of an upstream checkpoint.
UPSTREAM_RESOLUTION = 224
# - BiT-M-*-ILSVRC2012: the released code's BiT-HyperRule trains and tests ILSVRC-2012 (images larger than 96x96)
#   at crop 480 (big_transfer bit_hyperrule.get_resolution -> (512, 480); BIT_RECIPE.md "BiT-HyperRule").
#   (timm evaluates five of these files at 448 and R152x4 at 480; the difference in accuracy is small.)
ILSVRC2012_FINETUNED_RESOLUTION = 480


@dataclass(frozen=True)
class PublishedCheckpoint:
    name: str  # canonical spelling
    file: str  # path under the base URL
    depths: tuple[int, ...]
    width_factor: int
    num_labels: int
    upstream_dataset: str  # labels.IMAGENET21K | labels.ILSVRC2012
    fine_tuned_on: str | None
    resolution: int

    @property
    def head_dataset(self) -> str:
        return self.fine_tuned_on or self.upstream_dataset

    @property
    def url(self) -> str:
        base = os.environ.get(BIT_WEIGHTS_URL_ENV) or DEFAULT_BIT_WEIGHTS_URL
        return f"{base.rstrip('/')}/{self.file}"


def _catalog() -> dict[str, PublishedCheckpoint]:
    in21k, in1k = labels.IMAGENET21K, labels.ILSVRC2012
    entries = []
    for depth, width in PUBLISHED_ARCHITECTURES:
        arch = {"depths": RESNET_DEPTHS[depth], "width_factor": width}
        for name, upstream, fine_tuned, resolution in (
            (f"BiT-S-R{depth}x{width}", in1k, None, UPSTREAM_RESOLUTION),
            (f"BiT-M-R{depth}x{width}", in21k, None, UPSTREAM_RESOLUTION),
            (f"BiT-M-R{depth}x{width}-ILSVRC2012", in21k, in1k, ILSVRC2012_FINETUNED_RESOLUTION),
        ):
            classes = ILSVRC2012_NUM_CLASSES if (fine_tuned or upstream) == in1k else IMAGENET21K_NUM_CLASSES
            entries.append(
                PublishedCheckpoint(
                    name,
                    f"{name}.npz",
                    **arch,
                    num_labels=classes,
                    upstream_dataset=upstream,
                    fine_tuned_on=fine_tuned,
                    resolution=resolution,
                )
            )
    # The distilled students learned ILSVRC-2012 from a BiT-M teacher; the teachers are BiT-M fine-tuned on it.
    # Each was trained and evaluated at the resolution in its file name.
    for resolution in (224, 160):
        entries.append(
            PublishedCheckpoint(
                f"BiT-R50x1-distilled-{resolution}",
                f"distill/R50x1_{resolution}.npz",
                RESNET_DEPTHS[50],
                1,
                ILSVRC2012_NUM_CLASSES,
                in1k,
                None,
                resolution,
            )
        )
    for resolution in (224, 384):
        entries.append(
            PublishedCheckpoint(
                f"BiT-M-R152x2-teacher-{resolution}",
                f"distill/R152x2_T_{resolution}.npz",
                RESNET_DEPTHS[152],
                2,
                ILSVRC2012_NUM_CLASSES,
                in21k,
                in1k,
                resolution,
            )
        )
    return {entry.name: entry for entry in entries}


PUBLISHED_CHECKPOINTS: dict[str, PublishedCheckpoint] = _catalog()
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


# --- from_pretrained by name ---------------------------------------------------------------------------------


def resolve_pretrained_name(
    name: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    **_other_from_pretrained_kwargs,
) -> str | os.PathLike:
    """What `from_pretrained(name, ...)` should load: `name` itself, or the converted folder of a published name.

    `name` is returned unchanged unless it is a published BiT name (`find_published_checkpoint`) that is neither
    a local path nor a Hub model repository (cached, or found on the Hub; an unreachable Hub counts as not
    found). Then the published checkpoint is downloaded, converted and cached once, and its folder returned.
    """
    if not isinstance(name, str) or os.path.exists(name):
        return name
    checkpoint = find_published_checkpoint(name)
    if checkpoint is None or _is_hub_model(name, cache_dir, revision, token, local_files_only):
        return name
    logger.info("%s is not a Hub repository: loading the published checkpoint %s.", name, checkpoint.url)
    return str(converted_published_folder(checkpoint, local_files_only=local_files_only))


def _is_hub_model(name: str, cache_dir, revision, token, local_files_only: bool) -> bool:
    """Whether the Hub has (or the Hub cache holds) a model repository `name`, asked once, without retries.

    (Left to itself, transformers retries an unreachable Hub five times, about 25 s, and then raises an OSError
    that does not tell "no such repository" from "no network"; one direct query tells them apart quickly.)
    """
    try:
        if isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache_dir, revision=revision), str):
            return True
        if local_files_only or constants.HF_HUB_OFFLINE:
            return False
        HfApi().model_info(name, revision=revision, token=token, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        return True
    except (GatedRepoError, RevisionNotFoundError):
        return True  # it exists; transformers reports why it cannot be loaded
    except (RepositoryNotFoundError, HFValidationError):
        return False
    except (OfflineModeIsEnabled, httpx.TransportError, HfHubHTTPError) as error:
        logger.info("The Hub cannot be asked about %s (%s); using the published checkpoint.", name, error)
        return False


def converted_published_folder(checkpoint: PublishedCheckpoint, *, local_files_only: bool = False) -> Path:
    """The converted folder of a published checkpoint (published head, float32), converting it on first use.

    Cached per source URL (`<cache>/converted/<hash of the URL>/<name>`), so that a mirror (`BIT_WEIGHTS_URL`)
    never gets a conversion of another server's file. `local_files_only`: convert only a cached download.
    """
    from .convert import convert_to_folder

    url = checkpoint.url
    folder = cache_folder("bit_models", "converted") / url_digest(url) / checkpoint.name
    marker = folder / "bit_conversion.json"  # written inside the atomic conversion: present = complete
    if not marker.is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(folder.with_name(folder.name + ".lock")):
            if not marker.is_file():
                # The checkpoint itself, not its name: a folder of that name in the working directory is not it.
                convert_to_folder(checkpoint, folder, local_files_only=local_files_only)
    return folder


def route_auto_classes_through_published_names(*auto_classes) -> None:
    """Make `AutoModel.from_pretrained("BiT-M-R50x1")` (and the other given Auto classes) load published names.

    The Auto classes read the config from the name before any model class is involved, so the name is resolved
    (`resolve_pretrained_name`) in front of their `from_pretrained`. Every other name passes through untouched.
    """
    for auto_class in auto_classes:
        if not getattr(auto_class.from_pretrained, "_resolves_published_bit_names", False):
            auto_class.from_pretrained = _resolving_published_names(auto_class.from_pretrained.__func__)


def _resolving_published_names(from_pretrained):
    @functools.wraps(from_pretrained)
    def resolving(cls, pretrained_model_name_or_path, *args, **kwargs):
        return from_pretrained(cls, resolve_pretrained_name(pretrained_model_name_or_path, **kwargs), *args, **kwargs)

    resolving._resolves_published_bit_names = True
    return classmethod(resolving)


__all__ = [
    "DEFAULT_BIT_WEIGHTS_URL",
    "PUBLISHED_CHECKPOINTS",
    "PUBLISHED_CHECKPOINT_NAMES",
    "PublishedCheckpoint",
    "download_npz_url",
    "download_published",
    "find_published_checkpoint",
    "resolve_pretrained_name",
]
