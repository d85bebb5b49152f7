"""Downloading checkpoint files: streamed, resumable, validated, cached under the Hugging Face cache.

A file is downloaded into `<name>.incomplete` beside its cache entry, resumed with an HTTP Range request after
a dropped connection (in the same call, or in a later one after the process was interrupted), and renamed to
its cache entry only once it is complete and passes validation. A file that fails validation is deleted, so a
truncated or corrupt download is never cached or used. The cache lives in the Hugging Face assets cache
(`$HF_HOME/assets/bit-transfer/...`, see `huggingface_hub.cached_assets_path`), one folder per URL.

`HF_HUB_OFFLINE=1` forbids downloads here as it does for the Hub: only cached files are used.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import cached_assets_path, constants
from huggingface_hub.utils import WeakFileLock
from huggingface_hub.utils import tqdm as hf_tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS

logger = logging.getLogger(__name__)

CACHE_LIBRARY_NAME = "bit-transfer"
CHUNK_BYTES = 1 << 20
# Seconds without any byte from the server before a read gives up (and the download resumes).
READ_TIMEOUT_SECONDS = 60
# Interrupted transfers one call resumes before it gives up. Every attempt must receive bytes (one that gets
# none ends the call at once, as a dead server or network should), so this only bounds a call against a server
# that keeps dropping the connection part-way; the partial file is kept and the next call continues from it, so
# giving up loses nothing. 5 is headroom for a flaky link, not a measured value.
MAX_RESUMES = 5


# What a dropped or stalled connection raises while reading (disk errors are not among them).
_TRANSFER_ERRORS = (ConnectionError, TimeoutError, ssl.SSLError, http.client.HTTPException, urllib.error.URLError)


class DownloadError(OSError):
    """A file could not be downloaded (offline, unreachable, refused, or invalid once downloaded)."""


def cache_folder(namespace: str, subfolder: str) -> Path:
    """A folder of our cache in the Hugging Face assets cache, e.g. `cache_folder("bit_models", "downloads")`."""
    return cached_assets_path(CACHE_LIBRARY_NAME, namespace, subfolder, assets_dir=constants.HF_ASSETS_CACHE)


def url_digest(url: str) -> str:
    """A short, file-name-safe key of `url` for cache folders (different URLs, different folders)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


def cached_download_path(url: str) -> Path:
    """Where the download of `url` is (or would be) cached: `<cache>/<hash of the URL>/<file name>`."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    return cache_folder("bit_models", "downloads") / url_digest(url) / name


def download_to_cache(
    url: str,
    *,
    validate: Callable[[Path], object],
    offline_hint: str,
    local_files_only: bool = False,
) -> Path:
    """The cached copy of `url`, downloading it first if needed and allowed.

    `validate(path)` raises `ValueError` if a completed download is unusable; the file is then deleted and
    `DownloadError` raised. `offline_hint` ends the error raised when the file cannot be downloaded (offline,
    `local_files_only`, unreachable), telling the user what to do instead.
    """
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise DownloadError(f"Cannot download {url!r}: expected an http:// or https:// URL.")
    target = cached_download_path(url)
    if target.is_file():
        return target
    if local_files_only:
        raise DownloadError(f"{url} is not cached and local_files_only=True forbids downloading it. {offline_hint}")
    if constants.HF_HUB_OFFLINE:
        raise DownloadError(f"{url} is not cached and downloads are disabled (HF_HUB_OFFLINE=1). {offline_hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(target.with_name(target.name + ".lock")):
        if target.is_file():  # another process finished it while we waited for the lock
            return target
        partial = target.with_name(target.name + ".incomplete")
        _download_resuming(url, partial, offline_hint)
        with open(partial, "rb") as stream:  # on disk before it is renamed into the cache
            os.fsync(stream.fileno())
        try:
            validate(partial)
        except ValueError as error:
            partial.unlink(missing_ok=True)
            raise DownloadError(
                f"The file downloaded from {url} is unusable ({error}); it was discarded and nothing was cached."
            ) from error
        os.replace(partial, target)
    logger.info("Cached %s at %s", url, target)
    return target


def _download_resuming(url: str, partial: Path, offline_hint: str) -> None:
    """Download `url` into `partial`, continuing from its current size, until the server's length is reached."""
    resumes = 0
    while True:
        attempt = _Attempt(offset=partial.stat().st_size if partial.exists() else 0)
        try:
            if _transfer(url, partial, attempt):
                return
            failure, cause = "the server sent fewer bytes than it announced", None
        except urllib.error.HTTPError as error:
            raise DownloadError(f"Cannot download {url}: HTTP {error.code} {error.reason}.") from error
        except _TRANSFER_ERRORS as error:
            failure, cause = _reason(error), error
        if attempt.received == 0:
            raise DownloadError(f"Cannot download {url}: {failure}. {offline_hint}") from cause
        resumes += 1
        if resumes > MAX_RESUMES:
            raise DownloadError(
                f"Downloading {url} was interrupted {resumes} times ({failure}). The partial file {partial} is "
                "kept: calling again resumes it."
            )
        logger.warning("Download of %s interrupted (%s); resuming at byte %d.", url, failure, partial.stat().st_size)


@dataclass
class _Attempt:
    """One request's starting size of the partial file, and the bytes it has written so far."""

    offset: int
    received: int = 0


def _transfer(url: str, partial: Path, attempt: _Attempt) -> bool:
    """One HTTP request appending to `partial` from byte `attempt.offset`. True when the file is complete."""
    response = _open_rest(url, partial, attempt)
    if response is None:
        return True
    with response:
        start, total = _content_range(response, attempt.offset)
        mode = "ab" if start else "wb"  # a 200 answer to a Range request restarts from byte 0
        with (
            open(partial, mode) as stream,
            hf_tqdm(
                desc=Path(urllib.parse.urlparse(url).path).name,
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
            ) as progress,
        ):
            while chunk := response.read(CHUNK_BYTES):
                stream.write(chunk)
                attempt.received += len(chunk)
                progress.update(len(chunk))
    return total is None or partial.stat().st_size == total


def _open_rest(url: str, partial: Path, attempt: _Attempt) -> http.client.HTTPResponse | None:
    """The response carrying `url` from byte `attempt.offset` on, or None if `partial` already holds every byte.

    A server answers 416 (Range Not Satisfiable) when the partial file is as long as the file or longer, saying
    the file's size in `Content-Range: bytes */SIZE`. As long: an earlier call received every byte but stopped
    before checking the file, and the caller checks it now. Otherwise the partial file is not a prefix of the
    file (it changed on the server): the download restarts from byte 0.
    """
    try:
        return urllib.request.urlopen(_request(url, attempt.offset), timeout=READ_TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not attempt.offset:
            raise
        match = re.fullmatch(r"bytes \*/(\d+)", (error.headers.get("Content-Range") or "").strip())
        if match is not None and int(match.group(1)) == attempt.offset:
            logger.info("%s: the partial download already holds all %d bytes.", url, attempt.offset)
            return None
        logger.warning("%s: the partial download is not a prefix of the file; restarting.", url)
        partial.unlink()
        attempt.offset = 0
        return urllib.request.urlopen(_request(url, 0), timeout=READ_TIMEOUT_SECONDS)


def _request(url: str, offset: int) -> urllib.request.Request:
    headers = {"User-Agent": "bit-transfer", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.Request(url, headers=headers)


def _content_range(response: http.client.HTTPResponse, offset: int) -> tuple[int, int | None]:
    """(first byte of the body, total file size or None) of a response to a request starting at `offset`."""
    length = response.headers.get("Content-Length")
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != offset:
            raise DownloadError(
                f"Cannot resume {response.url}: asked for bytes from {offset}, the server answered Content-Range "
                f"{response.headers.get('Content-Range')!r}."
            )
        total = match.group(3)
        return offset, int(total) if total != "*" else None
    return 0, int(length) if length is not None else None


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        return f"network error ({error.reason})"
    if isinstance(error, http.client.IncompleteRead):
        return "connection closed before the end of the file"
    return f"{type(error).__name__}: {error}"


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_BYTES * 8):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["DownloadError", "cache_folder", "cached_download_path", "download_to_cache", "sha256_of_file"]
