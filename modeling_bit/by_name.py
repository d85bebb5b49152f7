"""`from_pretrained("bit-m-r101x3")`: published BiT names resolve to converted checkpoints.

A local folder or a Hub repository of that name wins; otherwise the published checkpoint is downloaded, converted
once into `<HF assets cache>/bit-transfer/bit_models/converted/<hash of the URL>/<name>` (the log says where) and
that folder is loaded. `route_through_published_names` puts this in front of the `from_pretrained` of our model
classes and of the Auto classes; every other name passes through untouched.
"""

from __future__ import annotations

import functools
import logging
import os
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

from .convert import convert_to_folder
from .download import cache_folder, url_digest
from .folder_layout import CONFIG_FILE, CONVERSION_FILE
from .published import PublishedCheckpoint, find_published_checkpoint

logger = logging.getLogger(__name__)


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
    return str(converted_published_folder(checkpoint, local_files_only=local_files_only))


def _is_hub_model(name: str, cache_dir, revision, token, local_files_only: bool) -> bool:
    """Whether the Hub has (or the Hub cache holds) a model repository `name`, asked once, without retries.

    (Left to itself, transformers retries an unreachable Hub five times, about 25 s, and then raises an OSError
    that does not tell "no such repository" from "no network"; one direct query tells them apart quickly.)
    """
    try:
        if isinstance(try_to_load_from_cache(name, CONFIG_FILE, cache_dir=cache_dir, revision=revision), str):
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
    url = checkpoint.url
    folder = cache_folder("bit_models", "converted") / url_digest(url) / checkpoint.name
    marker = folder / CONVERSION_FILE  # written inside the atomic conversion: present = complete
    if not marker.is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(folder.with_name(folder.name + ".lock")):
            if not marker.is_file():
                # Said once, where it happens: the conversion writes the checkpoint's size again on disk.
                logger.warning(
                    "%s is not a Hub repository: converting %s into %s (once).", checkpoint.name, url, folder
                )
                # The checkpoint itself, not its name: a folder of that name in the working directory is not it.
                convert_to_folder(checkpoint, folder, local_files_only=local_files_only)
    return folder


def route_through_published_names(*classes) -> None:
    """Make `from_pretrained` of the given classes (ours, and the Auto classes) load published names.

    The Auto classes read the config from the name before any model class is involved, so the name is resolved
    (`resolve_pretrained_name`) in front of their `from_pretrained`. Every other name passes through untouched.
    """
    for owner in classes:
        if not getattr(owner.from_pretrained, "_resolves_published_bit_names", False):
            owner.from_pretrained = _resolving_published_names(owner.from_pretrained.__func__)


def _resolving_published_names(from_pretrained):
    @functools.wraps(from_pretrained)
    def resolving(cls, pretrained_model_name_or_path, *args, **kwargs):
        return from_pretrained(cls, resolve_pretrained_name(pretrained_model_name_or_path, **kwargs), *args, **kwargs)

    resolving._resolves_published_bit_names = True
    return classmethod(resolving)


__all__ = ["converted_published_folder", "resolve_pretrained_name", "route_through_published_names"]
