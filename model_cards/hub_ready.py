"""`bit-convert --all`: one Hub-ready folder per published BiT checkpoint, optionally pushed to the Hub.

    bit-convert --all --output-root R --namespace NS [--names NAME ...] [--push]

Each published checkpoint (`modeling_bit.PUBLISHED_CHECKPOINT_NAMES`) becomes `R/<name in lower case>`: the
converted weights with the published head and its class names, configs, the widget's example images and the
card, written for the repository `NS/<name in lower case>` (widget URLs, usage code, and for fine-tuned checkpoints
the base model `NS/bit-m-r…` when the same run writes it). `--namespace` is required: a folder is upload-ready only
when its card names its repository. `--push` uploads each folder there.

Re-running is cheap and safe: a folder that already holds a complete conversion of its checkpoint is kept (only its
card and examples are re-rendered, identically), and a repository that already holds identical files is left
alone. A name that fails is reported and the others continue; the exit status says whether all succeeded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import tqdm as hf_tqdm

from modeling_bit.checkpoint_reading import CheckpointError
from modeling_bit.convert import ConversionError, convert_to_folder
from modeling_bit.download import DownloadError
from modeling_bit.folder_layout import CONVERSION_FILE, WEIGHTS_FILE
from modeling_bit.published import (
    PUBLISHED_CHECKPOINTS,
    PublishedCheckpoint,
    find_published_checkpoint,
    published_names_help,
)
from modeling_bit.variants import upstream_checkpoint

from . import prepare_hub_folder
from .card import CardOptions, check_repo_id
from .facts import CardError
from .hub import HubPushError, PushResult, check_can_push, push_folder

logger = logging.getLogger(__name__)

PUBLISHED_DTYPE = "float32"


class HubReadyError(ValueError):
    """Unusable `--all` options (unknown names, --push without --namespace, ...)."""


@dataclass(frozen=True)
class Outcome:
    name: str
    folder: Path
    repo_id: str
    converted: bool = False  # False: an earlier complete conversion was kept
    push: PushResult | None = None
    error: str | None = None


def repo_name(checkpoint: PublishedCheckpoint) -> str:
    return checkpoint.name.lower()


def select_checkpoints(names: Sequence[str] | None) -> list[PublishedCheckpoint]:
    if not names:
        return list(PUBLISHED_CHECKPOINTS.values())
    found = {name: find_published_checkpoint(name) for name in names}
    unknown = [name for name, checkpoint in found.items() if checkpoint is None]
    if unknown:
        raise HubReadyError(
            f"Not published BiT names: {', '.join(unknown)}. Published names (any case): {published_names_help()}."
        )
    return list(dict.fromkeys(found.values()))


def holds_complete_conversion(folder: Path, checkpoint: PublishedCheckpoint) -> bool:
    """Whether `folder` is a finished `bit-convert` of `checkpoint` with its published head (conversions are atomic,
    so the metadata file exists only beside complete weights)."""
    try:
        record = json.loads((folder / CONVERSION_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        record.get("published_name") == checkpoint.name
        and record.get("head") == "published"
        and record.get("dtype") == PUBLISHED_DTYPE
        and (folder / WEIGHTS_FILE).is_file()
    )


def write_published_folders(
    output_root: str | os.PathLike,
    names: Sequence[str] | None = None,
    *,
    namespace: str | None,
    push: bool = False,
) -> list[Outcome]:
    """Write (and with `push`, upload) the Hub-ready folder of every selected published checkpoint."""
    checkpoints = select_checkpoints(names)
    if not namespace:
        # A card names its repository (widget image URLs, usage code) and its base model's: without the namespace
        # these would be missing or placeholders, and the folder would not be ready to upload.
        raise HubReadyError(
            "--all needs --namespace NS: the Hub user or organisation the repositories are for (the cards' widget "
            "images, usage code and base-model links name NS/<checkpoint>)."
        )
    try:
        check_repo_id(f"{namespace}/{repo_name(checkpoints[0])}", "--namespace", namespaced=True)
    except CardError as error:
        raise HubReadyError(f"--namespace {namespace!r} cannot name Hub repositories: {error}") from error
    if push:
        check_can_push()  # before hours of downloads, not after
    output_root = Path(output_root)
    nearest_existing = next(path for path in (output_root, *output_root.absolute().parents) if path.exists())
    if not nearest_existing.is_dir():  # every checkpoint would fail the same way
        raise HubReadyError(f"--output-root {output_root}: {nearest_existing} is a file; expected a folder.")
    selected = {checkpoint.name for checkpoint in checkpoints}
    outcomes = []
    for checkpoint in hf_tqdm(checkpoints, desc="Published checkpoints", unit="checkpoint"):
        folder = output_root / repo_name(checkpoint)
        repo_id = f"{namespace}/{repo_name(checkpoint)}"
        upstream = upstream_checkpoint(checkpoint)
        # A base model is named only when its repository is written by the same run.
        base_model = f"{namespace}/{repo_name(upstream)}" if upstream and upstream.name in selected else None
        converted, result = False, None
        options = CardOptions(repo_id=repo_id, base_model=base_model)
        try:
            if holds_complete_conversion(folder, checkpoint):
                prepare_hub_folder(folder, options)  # re-rendered: the same bytes for the same folder
            else:
                # The card and examples go into the staging folder, inside the conversion's atomic swap.
                staged = dataclasses.replace(options, folder_name=folder.name)
                convert_to_folder(
                    checkpoint,
                    folder,
                    dtype=PUBLISHED_DTYPE,
                    finish=functools.partial(prepare_hub_folder, options=staged),
                )
                converted = True
            if push:
                result = push_folder(folder, repo_id)
        except (ConversionError, CheckpointError, DownloadError, CardError, HubPushError) as error:
            logger.error("%s: %s", checkpoint.name, error)
            outcomes.append(Outcome(checkpoint.name, folder, repo_id, converted, result, error=str(error)))
            continue
        outcomes.append(Outcome(checkpoint.name, folder, repo_id, converted, result))
    return outcomes


def describe(outcome: Outcome) -> str:
    if outcome.error:
        return f"{outcome.name}: FAILED: {outcome.error}"
    line = (
        f"{outcome.name} -> {outcome.folder} ({'converted' if outcome.converted else 'kept the earlier conversion'})"
    )
    if outcome.push is not None:
        line += f"; {outcome.push.describe()}"
    return line


def run(output_root: str, names: Sequence[str] | None, namespace: str | None, push: bool) -> int:
    """The `--all` command: write, report one line per checkpoint, return the exit status."""
    outcomes = write_published_folders(output_root, names, namespace=namespace, push=push)
    for outcome in outcomes:
        print(describe(outcome))
    failed = [outcome.name for outcome in outcomes if outcome.error]
    if failed:
        print(
            f"{len(failed)} of {len(outcomes)} failed: {', '.join(failed)}. Run the same command again to retry them."
        )
    return 1 if failed else 0


__all__ = [
    "HubReadyError",
    "Outcome",
    "holds_complete_conversion",
    "run",
    "write_published_folders",
]
