"""BiT upstream pre-training: the paper's recipe on accelerate, and a small upstream checkpoint shipped inside.

- `python pretraining/pretrain.py ...` (or under `torchrun` / `accelerate launch`): pre-train a BiT network.
- `embedded_checkpoint_path()`: the folder of the embedded upstream checkpoint (bit-tiny pre-trained on the
  procedurally generated glyph dataset of `pretraining.synthetic`), which the fine-tuning main job loads.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_CHECKPOINT_NAME = "bit-tiny-glyphs"

__all__ = ["EMBEDDED_CHECKPOINT_NAME", "embedded_checkpoint_path"]


def embedded_checkpoint_path() -> Path:
    """The folder of the upstream checkpoint shipped in the package (a `from_pretrained` folder)."""
    path = Path(__file__).resolve().parent / "embedded" / EMBEDDED_CHECKPOINT_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"The embedded upstream checkpoint is missing from {path}: the package was installed without its "
            "package data (reinstall bit-transfer), or the folder was deleted."
        )
    return path
