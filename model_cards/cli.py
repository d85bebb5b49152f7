"""`bit-model-card` (also `python -m model_cards`): make any folder bit-transfer produced Hub-ready, and push it.

    bit-model-card FOLDER [--repo-id NS/NAME] [--license ID] [--base-model ID] [--push]

Writes the widget's example images into FOLDER/examples and re-renders FOLDER/README.md: for the repository
NS/NAME when given (widget URLs, usage code), with the licence you choose (none is assumed for models you trained;
published BiT weights are apache-2.0) and the base model you name. `--push` then uploads FOLDER to NS/NAME
(create_repo + upload_folder; a repository that already holds identical files is left alone).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import CardOptions, prepare_hub_folder
from .command_line import CommandLineParser
from .facts import CardError
from .hub import HubPushError, check_can_push, push_folder


@dataclass
class ModelCardArguments:
    """Options of `bit-model-card` (FOLDER is positional)."""

    repo_id: str | None = field(
        default=None,
        metadata={"help": "The Hub repository the folder is for, 'namespace/name'.", "metavar": "NS/NAME"},
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": "Hub licence id of the weights (e.g. apache-2.0, mit, cc-by-4.0). Not set unless given, "
            "except for published BiT weights (apache-2.0).",
            "metavar": "ID",
        },
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Hub id of the model these weights derive from.", "metavar": "ID"}
    )
    push: bool = field(default=False, metadata={"help": "Upload the folder to --repo-id after rendering the card."})


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandLineParser(ModelCardArguments, prog="bit-model-card", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "folder",
        metavar="FOLDER",
        help="A folder written by bit-convert, bit-finetune, pretraining or save_pretrained.",
    )
    arguments, positional = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if arguments.push and not arguments.repo_id:
        parser.error("--push needs --repo-id NS/NAME.")
    options = CardOptions(repo_id=arguments.repo_id, license=arguments.license, base_model=arguments.base_model)
    try:
        if arguments.push:
            check_can_push()  # before the folder is touched
        card = prepare_hub_folder(positional.folder, options)
        print(card)
        if arguments.push:
            result = push_folder(positional.folder, arguments.repo_id)
            print(result.describe() + (f": {result.commit_url}" if result.commit_url else ""))
    except (CardError, HubPushError) as error:
        print(f"bit-model-card: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
