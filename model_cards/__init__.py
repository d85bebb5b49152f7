"""Model cards and Hub-ready folders for every BiT model bit-transfer produces.

`write_model_card(folder)` is the one entry point producers (`bit-convert`, `bit-finetune`, pretraining) call
after saving a folder: it reads what the folder records about itself (`facts.py`), draws plots next to the card
when matplotlib is installed (`plots.py`), and renders `README.md` from the one Jinja template with metadata built
by huggingface_hub's `ModelCardData` and `EvalResult` (`card.py`).

`write_card(folder, CardOptions(repo_id=..., license=..., base_model=...))` renders the card for a Hub repository
(widget examples and usage code point at it); `prepare_hub_folder` adds the widget's example images first;
`push_folder` uploads a folder (`hub.py`); `bit-convert --all` writes and pushes every published checkpoint
(`hub_ready.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

from modeling_bit.file_utils import atomic_write_text

from .card import CardOptions, build_model_card
from .examples import shipped_example_images, write_example_images
from .facts import CardError, FolderKind, read_folder
from .plots import draw_plots

README = "README.md"


def write_card(folder: str | os.PathLike, options: CardOptions = CardOptions()) -> Path:
    """Render `README.md` (and its plots) for the saved BiT folder `folder`; return the card's path."""
    folder = Path(folder)
    facts = read_folder(folder)
    card = build_model_card(facts, draw_plots(facts), shipped_example_images(folder), options)
    path = folder / README
    atomic_write_text(path, str(card))
    return path


def write_model_card(folder: str | os.PathLike) -> Path:
    """Write `README.md` (a Hub model card) into a saved BiT folder and return its path."""
    return write_card(folder)


def prepare_hub_folder(folder: str | os.PathLike, options: CardOptions = CardOptions()) -> Path:
    """Make `folder` ready for `huggingface_hub.upload_folder`: widget example images, then the card."""
    write_example_images(folder)
    return write_card(folder, options)


__all__ = ["CardError", "CardOptions", "FolderKind", "prepare_hub_folder", "write_card", "write_model_card"]
