"""Model cards for every folder bit-transfer produces.

`write_model_card(folder)` is the one entry point producers call after saving a folder (conversion,
fine-tuning, pretraining). This first version writes a basic card from `config.json`; the model-cards
issue enriches it (template, results, plots, widget) behind the same call.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from modeling_bit.file_utils import atomic_write_text

__all__ = ["write_model_card"]


def write_model_card(folder: str | os.PathLike) -> Path:
    """Write `README.md` (a Hub model card) into a saved BiT folder and return its path."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    num_labels = len(config.get("id2label") or {}) or None
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["bit", "resnetv2", "image-classification", "vision"],
    )
    body = (
        f"# {folder.name}\n\n"
        "A BiT (Big Transfer, ResNet-v2 with Group Normalization and Weight Standardization) image "
        f"classifier with stage widths {config.get('hidden_sizes')} and depths {config.get('depths')}"
        + (f", {num_labels} classes" if num_labels else "")
        + ".\n\n## Usage\n\n```python\nfrom transformers import pipeline\n\n"
        f'classify = pipeline("image-classification", model="{folder.name}")\n'
        'print(classify("image.jpg"))\n```\n'
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    path = folder / "README.md"
    atomic_write_text(path, str(card))
    return path
