"""Atomic writes: a reader never sees a half-written file or folder, a crash never leaves one behind.

Folders are assembled in a staging folder beside their target (`.<name>.<host>-<pid>-<random>.partial`) and renamed
into place. The names say whose they are, so the next write into the same parent removes the staging folders of
processes of this machine that no longer run (a killed conversion's would otherwise stay forever, as large as the
model) and puts back a folder such a process had moved aside (`.previous`) without installing its replacement.
Another machine's staging folders (shared storage) are left alone: whether their process runs cannot be seen here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

# `.<target>.<host>-<pid>-<random>.<role>`: a staging folder being filled, or a replaced folder being deleted.
_STAGING_NAME = re.compile(r"\.(?P<target>.+)\.(?P<host>\w+)-(?P<pid>\d+)-\w+\.(?P<role>partial|previous)")
# A rename onto an existing folder (or file) fails with one of these; the writer then moves it aside.
_OCCUPIED = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)
# Concurrent writers each retry until their own folder is in place; this only bounds a pathological race.
_MAX_INSTALL_ATTEMPTS = 100


def _default_mode(directory: bool) -> int:
    """What open()/mkdir() would give under the current umask (mkstemp/mkdtemp make private files)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, _default_mode(directory=False))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def _host() -> str:
    return re.sub(r"\W", "_", socket.gethostname()) or "host"


def _owner_tag(pid: int | None = None) -> str:
    """`<host>-<pid>-`: the owner part of the staging names of process `pid` (by default this one)."""
    return f"{_host()}-{pid or os.getpid()}-"


def _process_runs(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def remove_stale_staging(parent: str | os.PathLike) -> None:
    """Remove what `atomic_directory` writers of this machine that no longer run left in `parent`: their staging
    folders, and the folders they replaced (put back under their name when the replacement never arrived)."""
    parent = Path(parent)
    try:
        entries = [entry for entry in parent.iterdir() if entry.name.startswith(".")]
    except OSError:
        return
    host = _host()
    for entry in entries:
        match = _STAGING_NAME.fullmatch(entry.name)
        if match is None or match["host"] != host or _process_runs(int(match["pid"])):
            continue
        target = parent / match["target"]
        try:
            if match["role"] == "previous" and not target.exists():
                os.rename(entry, target)  # killed between moving the old folder aside and installing the new one
                continue
        except OSError:
            pass  # another writer got there first
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder beside `path`; on success it replaces `path` (an existing folder is removed only after
    the new one is in place), on failure it is deleted and `path` is untouched.

    Writers may race: two processes writing the same `path` both succeed, and the folder is the one whose rename came
    last, whole. Staging folders of this machine's processes that no longer run are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path.parent)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_owner_tag()}", suffix=".partial"))
    os.chmod(staging, _default_mode(directory=True))
    try:
        yield staging
        _install(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _install(staging: Path, path: Path) -> None:
    """Rename `staging` to `path`, moving whatever holds the name aside first (and deleting it once done)."""
    replaced: list[Path] = []
    try:
        for _ in range(_MAX_INSTALL_ATTEMPTS):
            try:
                os.rename(staging, path)
                return
            except OSError as error:
                if error.errno not in _OCCUPIED:
                    raise
            previous = path.with_name(f".{path.name}.{_owner_tag()}{secrets.token_hex(4)}.previous")
            try:
                os.rename(path, previous)
            except FileNotFoundError:
                continue  # another writer moved it aside first: try again
            replaced.append(previous)
        raise OSError(errno.EBUSY, f"{path} kept being replaced by other writers; {staging} was not installed")
    except BaseException:
        if replaced and not path.exists():
            os.rename(replaced.pop(), path)  # put the last folder we moved aside back under its name
        raise
    finally:
        for previous in replaced:
            shutil.rmtree(previous, ignore_errors=True)
