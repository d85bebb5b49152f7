"""Command lines a newcomer can read: `HfArgumentParser` dataclasses, with `--help` written for people.

`CommandLineParser` is transformers' `HfArgumentParser` (options from dataclass fields, `metadata={"help": ...}`)
with three changes to what `--help` shows, none to what is parsed:

- each option under its dash spelling only (`--num-labels`; `--num_labels` is still accepted);
- switches (bool fields that default to False) as plain flags, `--push`, not `--push [PUSH]` taking a value;
- text wrapped at spaces only, never inside a name such as `BiT-M-R50x1`, with paragraphs kept, and a default
  shown only where there is one to show.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import textwrap

from transformers import HfArgumentParser


class ReadableHelpFormatter(argparse.HelpFormatter):
    def _format_action_invocation(self, action: argparse.Action) -> str:
        dashed = [option for option in action.option_strings if not (option.startswith("--") and "_" in option)]
        if dashed and dashed != action.option_strings:
            action = copy.copy(action)
            action.option_strings = dashed
        return super()._format_action_invocation(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        return f"{text} (default: %(default)s)" if shown and "%(default)" not in text else text

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [" ".join(paragraph.split()) for paragraph in text.split("\n\n")]
        return "\n\n".join(
            textwrap.fill(paragraph, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)
            for paragraph in paragraphs
        )


class CommandLineParser(HfArgumentParser):
    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("formatter_class", ReadableHelpFormatter)
        super().__init__(dataclass_types, **kwargs)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        dashed = f"--{field.name.replace('_', '-')}"
        if field.type is bool and field.default is False:
            names = [dashed] + ([f"--{field.name}"] if "_" in field.name else [])
            parser.add_argument(*names, action="store_true", dest=field.name, help=field.metadata.get("help"))
            return
        HfArgumentParser._parse_dataclass_field(parser, field)
        action = parser._actions[-1]  # the one just added: its dash spelling first, as the usage line shows it
        action.option_strings = sorted(action.option_strings, key=lambda option: option != dashed)


__all__ = ["CommandLineParser", "ReadableHelpFormatter"]
