"""The layout of the folders bit-transfer writes: file names, head tensor names, the preprocessing size.

Every folder holds `config.json`, `model.safetensors`, `preprocessor_config.json` and one metadata file naming
how it was produced, written by its producer and read by the model cards:

- `bit_conversion.json`: converted by `bit-convert`;
- `bit_hyperrule.json` and `bit_finetune_args.json` (with `eval_results.json`, `all_results.json` and
  `training_log.json`): fine-tuned by `bit-finetune`; the best trial of `bit-finetune --search` adds
  `search_results.json` and `search_curve.png`;
- `bit_pretraining.json` (with `training_log.jsonl` and `probe_results.json`): pre-trained by `pretraining/`;
- none: a plain `save_pretrained` folder.

Producers and readers import the names from here, so the layout is declared once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# The older weights file of transformers folders, read (never written) when converting one.
PYTORCH_WEIGHTS_FILE = "pytorch_model.bin"
PREPROCESSOR_FILE = "preprocessor_config.json"
MODEL_CARD_FILE = "README.md"
# The files `from_pretrained` needs: a folder holding them is a complete model.
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)

CONVERSION_FILE = "bit_conversion.json"

HYPERRULE_FILE = "bit_hyperrule.json"
FINETUNE_ARGS_FILE = "bit_finetune_args.json"
EVAL_RESULTS_FILE = "eval_results.json"
ALL_RESULTS_FILE = "all_results.json"
FINETUNE_LOG_FILE = "training_log.json"
SEARCH_RESULTS_FILE = "search_results.json"
SEARCH_CURVE_FILE = "search_curve.png"

PRETRAINING_FILE = "bit_pretraining.json"
PRETRAINING_LOG_FILE = "training_log.jsonl"
PROBE_RESULTS_FILE = "probe_results.json"

# The classifier's parameters in `BitForImageClassification` (and stock transformers'): `classifier` is
# Sequential(Flatten, Linear).
HEAD_WEIGHT = "classifier.1.weight"
HEAD_BIAS = "classifier.1.bias"
HEAD_TENSORS = (HEAD_WEIGHT, HEAD_BIAS)

# Keys of an image processor's `size`, in the order their value is taken as the square side: BiT's processor
# saves height/width; other processors save a shortest or longest edge.
SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge")


def square_size(size) -> int | None:
    """The square side an image processor's `size` entry resizes to (an int or any of transformers' dict
    forms), or None when it names none."""
    if isinstance(size, dict):
        size = next((size[key] for key in SIZE_KEYS if isinstance(size.get(key), int)), None)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    return None


def folder_resolution(folder: str | os.PathLike) -> int | None:
    """The square resolution the folder's `preprocessor_config.json` resizes to; None when the folder has no
    readable preprocessor config or it names no size."""
    try:
        values = json.loads((Path(folder) / PREPROCESSOR_FILE).read_text())
    except (OSError, ValueError):
        return None
    return square_size(values.get("size")) if isinstance(values, dict) else None
