"""`bit-convert`: any published BiT checkpoint as a folder, with its model card, that our classes and stock
transformers load.

    bit-convert SOURCE --output DIR [--num-labels N] [--labels FILE] [--dtype float32|bfloat16|float16]
                                    [--resolution PIXELS]
    bit-convert --all --output-root R --namespace NS [--names NAME ...] [--push]

SOURCE is a published name (`BiT-M-R101x3`, `bit-s-r50x1`; case-insensitive; downloaded once into the Hugging Face
cache), a local `.npz` in the published layout or an http(s) URL of one, a timm ResNetV2-BiT state dict, or a
stock-transformers BiT folder (`modeling_bit.convert`). DIR gets the converted folder and its model card
(`README.md`), written inside the conversion's atomic swap: DIR appears complete, card included, or not at all.

`--all` writes one Hub-ready folder per published checkpoint into R (weights, configs, card, class names, widget
examples), each carded for the Hub repository NS/<name>, and with `--push` uploads them (`hub_ready.py`).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from modeling_bit.checkpoint_reading import CheckpointError
from modeling_bit.convert import ConversionError, convert_to_folder
from modeling_bit.download import DownloadError
from modeling_bit.published import PUBLISHED_CHECKPOINT_NAMES

from . import write_model_card
from .command_line import CommandLineParser
from .hub import HubPushError
from .hub_ready import HubReadyError, run


@dataclass
class ConvertArguments:
    """Options of `bit-convert` (SOURCE is positional)."""

    output: str | None = field(
        default=None,
        metadata={
            "help": "Folder to write (created; an earlier bit-convert output there is replaced).",
            "metavar": "DIR",
        },
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Replace the head with a zero-initialised one of this many classes.", "metavar": "N"},
    )
    labels: str | None = field(
        default=None,
        metadata={
            "help": "Replace the head with a zero-initialised one; FILE has one class name per line.",
            "metavar": "FILE",
        },
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Data type of the written weights."}
    )
    resolution: int | None = field(
        default=None,
        metadata={
            "help": "Preprocessing size to record (by default the checkpoint's: 224 upstream, 480 for -ILSVRC2012).",
            "metavar": "PIXELS",
        },
    )
    all: bool = field(
        default=False,
        metadata={"help": "Write a Hub-ready folder for every published checkpoint (or --names) into --output-root."},
    )
    output_root: str | None = field(
        default=None,
        metadata={"help": "With --all: the folder that receives one folder per checkpoint.", "metavar": "R"},
    )
    names: list[str] | None = field(
        default=None, metadata={"help": "With --all: only these published names (any case).", "metavar": "NAME"}
    )
    namespace: str | None = field(
        default=None,
        metadata={
            "help": "Required with --all: write the cards for the Hub repositories NS/<name> (and push there).",
            "metavar": "NS",
        },
    )
    push: bool = field(
        default=False,
        metadata={
            "help": "With --all: upload each folder to NS/<name> (create_repo + upload_folder; identical "
            "repositories are left alone)."
        },
    )


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(
        ConvertArguments,
        prog="bit-convert",
        description=__doc__.split("\n\n")[0],
        epilog=f"Published names (any case): {', '.join(PUBLISHED_CHECKPOINT_NAMES)}.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="Published BiT name, .npz file or http(s) URL, timm state dict (.safetensors/.bin/.pth), "
        "or transformers folder.",
    )
    return parser


def convert_with_card(source, output: str, **options) -> Path:
    """`convert_to_folder`, with the model card written into the staging folder, last, before it becomes `output`."""
    card = functools.partial(write_model_card, folder_name=Path(output).absolute().name)
    return convert_to_folder(source, output, finish=card, **options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments, positional = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if arguments.all:
        return _convert_all(parser, arguments, positional.source)
    all_only = [
        flag
        for flag, value in (
            ("--output-root", arguments.output_root),
            ("--names", arguments.names),
            ("--namespace", arguments.namespace),
            ("--push", arguments.push),
        )
        if value
    ]
    if all_only:
        parser.error(f"{', '.join(all_only)} only go with --all.")
    if positional.source is None or arguments.output is None:
        parser.error("expected SOURCE and --output DIR (or --all --output-root R).")
    try:
        folder = convert_with_card(
            positional.source,
            arguments.output,
            num_labels=arguments.num_labels,
            labels=arguments.labels,
            dtype=arguments.dtype,
            resolution=arguments.resolution,
        )
    except (ConversionError, CheckpointError, DownloadError) as error:
        print(f"bit-convert: error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def _convert_all(parser, arguments: ConvertArguments, source: str | None) -> int:
    single = [
        flag
        for flag, value in (
            ("SOURCE", source),
            ("--output", arguments.output),
            ("--num-labels", arguments.num_labels),
            ("--labels", arguments.labels),
            ("--resolution", arguments.resolution),
        )
        if value is not None
    ]
    if arguments.dtype != "float32":
        single.append("--dtype")
    if single:
        parser.error(
            f"--all writes the published checkpoints as published (float32, published heads): drop {', '.join(single)}."
        )
    if arguments.output_root is None:
        parser.error("--all needs --output-root R, the folder that receives one folder per checkpoint.")
    try:
        return run(arguments.output_root, arguments.names, arguments.namespace, arguments.push)
    except (HubReadyError, HubPushError) as error:
        print(f"bit-convert: error: {error}", file=sys.stderr)
        return 1


__all__ = ["ConvertArguments", "build_parser", "convert_with_card", "main"]

if __name__ == "__main__":
    sys.exit(main())
