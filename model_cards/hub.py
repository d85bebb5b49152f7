"""Push a Hub-ready folder to a model repository: `create_repo(exist_ok=True)`, then `upload_folder`.

- Idempotent: first, one `model_info(files_metadata=True)` request lists the repository's files with their hashes;
  when every local file is already there with the same content, nothing is created or sent.
- Resumable: run the same push again. Files already committed are dropped from the new commit by `upload_folder`
  itself (huggingface_hub 2.4 compares each file with the Hub's oid before committing), and data hf_xet already
  sent is deduplicated.
- The local folder is only read, never changed, whatever fails.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import httpx
from huggingface_hub.utils.sha import git_hash

from .card import check_repo_id
from .facts import CONFIG_FILE, CardError

README = "README.md"
# Hidden files (a crashed atomic write's temporary, editor or cache folders) never go to the Hub.
HIDDEN_PATTERNS = [".*", "*/.*"]
HASH_CHUNK_BYTES = 8 << 20


class HubPushError(RuntimeError):
    """The push could not be done; the local folder is unchanged."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    uploaded: bool  # False: the repository already held every file, nothing was sent
    changed_files: list[str]  # local files the repository lacked or held with other content
    commit_url: str | None = None


def local_files(folder: Path) -> dict[str, Path]:
    """The files `upload_folder` sends, by their path in the repository."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = path
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _same_content(path: Path, entry: RepoSibling) -> bool:
    if entry.size != path.stat().st_size:
        return False
    if entry.lfs is not None:  # large files: the Hub keeps their SHA-256
        return entry.lfs.sha256 == _sha256(path)
    return entry.blob_id == git_hash(path.read_bytes())  # small files: their git blob id


def files_differing_from_hub(api: HfApi, repo_id: str, folder: Path) -> list[str] | None:
    """Local files that the Hub repository lacks or holds with other content; None if there is no repository."""
    try:
        # One request, which huggingface_hub does not retry: an unreachable Hub is reported at once.
        info = api.model_info(repo_id, files_metadata=True)
    except RepositoryNotFoundError:
        return None
    remote = {sibling.rfilename: sibling for sibling in info.siblings or []}
    return [name for name, path in local_files(folder).items() if name not in remote or not _same_content(path, remote[name])]


def check_can_push(api: HfApi | None = None) -> None:
    """Raise `HubPushError` when a push cannot even start: offline mode, or no token."""
    if constants.HF_HUB_OFFLINE:
        raise HubPushError("HF_HUB_OFFLINE is set: pushing needs the Hub. Unset it and run the command again.")
    if (api.token if api is not None else None) is None and get_token() is None:
        raise HubPushError(
            "No Hugging Face token: log in with `hf auth login` or set HF_TOKEN to a token with write access, then "
            "run the command again."
        )


def push_folder(folder: str | os.PathLike, repo_id: str, *, api: HfApi | None = None) -> PushResult:
    """Upload `folder` to the model repository `repo_id` (created if missing); skip it if already identical."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / README).is_file():
        raise HubPushError(f"{folder} is not a Hub-ready folder: {CONFIG_FILE} and {README} are expected.")
    try:
        check_repo_id(repo_id, "repo id", namespaced=True)
    except CardError as error:
        raise HubPushError(str(error)) from error
    check_can_push(api)
    api = api or HfApi()
    try:
        differing = files_differing_from_hub(api, repo_id, folder)
        if differing == []:
            return PushResult(repo_id, uploaded=False, changed_files=[])
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            commit_message=f"Upload {folder.name} with bit-transfer",
            ignore_patterns=HIDDEN_PATTERNS,
        )
    except (httpx.TransportError, OfflineModeIsEnabled) as error:
        raise HubPushError(
            f"Cannot reach the Hub at {api.endpoint} ({error}). {folder} is unchanged; run the same command again "
            "to resume."
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        advice = "the token may lack write access to this namespace" if status in (401, 403) else "see the message"
        raise HubPushError(
            f"The Hub refused the push of {folder} to {repo_id} ({advice}): {error}. {folder} is unchanged."
        ) from error
    return PushResult(repo_id, uploaded=True, changed_files=differing or list(local_files(folder)),
                      commit_url=commit.commit_url)


__all__ = ["HubPushError", "PushResult", "check_can_push", "files_differing_from_hub", "local_files", "push_folder"]
