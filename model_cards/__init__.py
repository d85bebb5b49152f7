"""Model cards and Hub-ready folders for every BiT model bit-transfer produces.

`write_model_card(folder)` is the one entry point producers (`bit-convert`, `bit-finetune`, pretraining) call
after saving a folder: it reads what the folder records about itself (`facts.py`), draws plots next to the card
when matplotlib is installed (`plots.py`), and renders `README.md` from the Jinja templates with metadata built
by huggingface_hub's `ModelCardData` and `EvalResult` (`card.py`).

`write_card(folder, CardOptions(repo_id=..., license=..., base_model=...))` renders the card for a Hub repository
(widget examples and usage code point at it); `prepare_hub_folder` adds the widget's example images too. Every
input (records, ids, licence) is checked before anything is written: a refused card leaves the folder as it was.
`push_folder` uploads a folder (`hub.py`); `bit-convert --all` writes and pushes every published checkpoint
(`hub_ready.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

from modeling_bit.file_utils import atomic_write_text
from modeling_bit.folder_layout import MODEL_CARD_FILE

from .card import CardOptions, build_model_card
from .examples import example_images, shipped_example_images, write_example_images
from .facts import CardError, FolderKind, read_folder
from .plots import plan_plots, save_plots


def write_card(
    folder: str | os.PathLike, options: CardOptions = CardOptions(), *, with_examples: bool = False
) -> Path:
    """Render `README.md` (and its plots; with `with_examples`, the widget's example images) for the saved BiT folder
    `folder`; return the card's path. The card is built and checked in full before the first file is written."""
    folder = Path(folder)
    facts = read_folder(folder)
    plots = plan_plots(facts)
    examples = example_images() if with_examples else shipped_example_images(folder)
    card = str(build_model_card(facts, plots, examples, options))
    if with_examples:
        write_example_images(folder)
    save_plots(folder, plots)
    path = folder / MODEL_CARD_FILE
    atomic_write_text(path, card)
    return path


def write_model_card(folder: str | os.PathLike, *, folder_name: str | None = None) -> Path:
    """Write `README.md` (a Hub model card) into a saved BiT folder and return its path.

    `folder_name`: the name the folder will have, when `folder` is a staging folder renamed into place afterwards
    (the card refers to the folder by name)."""
    return write_card(folder, CardOptions(folder_name=folder_name))


def prepare_hub_folder(folder: str | os.PathLike, options: CardOptions = CardOptions()) -> Path:
    """Make `folder` ready for `huggingface_hub.upload_folder`: widget example images, plots and the card."""
    return write_card(folder, options, with_examples=True)


__all__ = ["CardError", "CardOptions", "FolderKind", "prepare_hub_folder", "write_card", "write_model_card"]
