"""Push a Hub-ready folder to a model repository: `create_repo(exist_ok=True)`, then `upload_folder`.

- Exact: the repository ends up holding the folder's files and nothing else. Files the folder no longer has (a plot
  an earlier card embedded, a renamed weights file) are deleted in the same commit (`delete_patterns`), except
  `.gitattributes`, which the Hub needs and `upload_folder` never deletes.
- Idempotent: first, one `model_info(files_metadata=True)` request lists the repository's files with their hashes;
  when it holds exactly the local files with the same content, nothing is created or sent.
- Resumable: run the same push again. Files already committed are dropped from the new commit by `upload_folder`
  itself (huggingface_hub 2.4 compares each file with the Hub's oid before committing), and data hf_xet already
  sent is deduplicated.
- The local folder is only read, never changed, whatever fails.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import httpx
from huggingface_hub.utils.sha import git_hash

from modeling_bit.folder_layout import CONFIG_FILE, MODEL_CARD_FILE

from .card import check_repo_id
from .facts import CardError

# Hidden files (a crashed atomic write's temporary, editor or cache folders) never go to the Hub.
HIDDEN_PATTERNS = (".*", "*/.*")
# Every remote file not in the folder is deleted by the upload (`upload_folder` keeps `.gitattributes` regardless).
STALE_PATTERNS = ("*",)
KEPT_REMOTE_FILES = frozenset({".gitattributes"})
HASH_CHUNK_BYTES = 8 << 20


class HubPushError(RuntimeError):
    """The push could not be done; the local folder is unchanged."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    uploaded: bool  # False: the repository already held exactly these files, nothing was sent
    changed_files: list[str]  # local files the repository lacked or held with other content
    deleted_files: list[str] = field(default_factory=list)  # remote files the folder does not have
    commit_url: str | None = None

    def describe(self) -> str:
        if not self.uploaded:
            return f"{self.repo_id} already holds exactly these files; left alone"
        deleted = f", deleted {len(self.deleted_files)} file(s) the folder does not have" if self.deleted_files else ""
        return f"pushed {len(self.changed_files)} file(s) to {self.repo_id}{deleted}"


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


@dataclass(frozen=True)
class Differences:
    changed: list[str]  # local files the repository lacks or holds with other content
    stale: list[str]  # remote files the folder does not have (the upload deletes them)

    @property
    def none(self) -> bool:
        return not (self.changed or self.stale)


def differences_from_hub(api: HfApi, repo_id: str, folder: Path) -> Differences | None:
    """How the Hub repository differs from the folder; None if there is no repository."""
    try:
        # One request, which huggingface_hub does not retry: an unreachable Hub is reported at once.
        info = api.model_info(repo_id, files_metadata=True)
    except RepositoryNotFoundError:
        return None
    remote = {sibling.rfilename: sibling for sibling in info.siblings or []}
    local = local_files(folder)
    return Differences(
        changed=[name for name, path in local.items() if name not in remote or not _same_content(path, remote[name])],
        stale=sorted(name for name in remote if name not in local and name not in KEPT_REMOTE_FILES),
    )


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
    if not (folder / CONFIG_FILE).is_file() or not (folder / MODEL_CARD_FILE).is_file():
        raise HubPushError(f"{folder} is not a Hub-ready folder: {CONFIG_FILE} and {MODEL_CARD_FILE} are expected.")
    try:
        check_repo_id(repo_id, "repo id", namespaced=True)
    except CardError as error:
        raise HubPushError(str(error)) from error
    check_can_push(api)
    api = api or HfApi()
    try:
        differences = differences_from_hub(api, repo_id, folder)
        if differences is not None and differences.none:
            return PushResult(repo_id, uploaded=False, changed_files=[])
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=folder,
            commit_message=f"Upload {folder.name} with bit-transfer",
            ignore_patterns=list(HIDDEN_PATTERNS),  # copies: upload_folder extends the list it is given
            delete_patterns=list(STALE_PATTERNS),
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
    if differences is None:  # a new repository: everything is sent
        differences = Differences(changed=list(local_files(folder)), stale=[])
    return PushResult(
        repo_id,
        uploaded=True,
        changed_files=differences.changed,
        deleted_files=differences.stale,
        commit_url=commit.commit_url,
    )


__all__ = [
    "Differences",
    "HubPushError",
    "PushResult",
    "check_can_push",
    "differences_from_hub",
    "local_files",
    "push_folder",
]
