"""The network to fine-tune: a checkpoint with a head for the task's labels, or a random initialisation.

BiT's protocol starts the new task's head at zero (BIT_RECIPE.md "Head re-initialised to zeros for a
new task"). `load_model_for_labels` keeps a checkpoint's head only when the checkpoint was trained on
exactly the same labels; otherwise the head is new and zero.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from transformers import AutoConfig

from modeling_bit import BitConfig, BitForImageClassification, canonical_preset_name
from modeling_bit.published import find_published_checkpoint

from .errors import FinetuneInputError

logger = logging.getLogger(__name__)


def label_maps(label_names: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    id2label = {index: str(name) for index, name in enumerate(label_names)}
    return id2label, {name: index for index, name in id2label.items()}


def _checkpoint_labels(model_name_or_path: str) -> list[str] | None:
    """The label names a checkpoint's config declares (AutoConfig resolves published BiT names too)."""
    try:
        config = AutoConfig.from_pretrained(str(model_name_or_path))
    except (OSError, ValueError):
        return None
    id2label = config.id2label or {}
    return [id2label[key] for key in sorted(id2label)] if id2label else None


def zero_head_(model: BitForImageClassification) -> None:
    head = model.classifier[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()


def load_model_for_labels(
    model_name_or_path: str | os.PathLike, label_names: Sequence[str], *, from_scratch: bool = False
) -> BitForImageClassification:
    """A BiT classifier for `label_names`, from a checkpoint (with a new zero head unless the checkpoint
    has exactly these labels) or, with `from_scratch`, randomly initialised with the architecture of a
    preset name (`bit-tiny`, `BiT-M-R50x1`, ...) or of a checkpoint's config."""
    id2label, label2id = label_maps(label_names)
    name = str(model_name_or_path)
    labels = {"id2label": id2label, "label2id": label2id}  # num_labels follows id2label
    if from_scratch:
        if canonical_preset_name(name) is not None:
            config = BitConfig.from_preset(name, **labels)
        else:
            try:
                config = BitConfig.from_pretrained(name, **labels)
            except OSError as error:
                raise FinetuneInputError(
                    f"--model {name!r}: with --from-scratch, expected a BiT preset name ({', '.join(BitConfig.preset_names())}) "
                    f"or a folder with a config.json ({error})."
                ) from error
        return BitForImageClassification(config)
    try:
        model = BitForImageClassification.from_pretrained(name, ignore_mismatched_sizes=True, **labels)
    except OSError as error:
        only_a_preset = canonical_preset_name(name) is not None and find_published_checkpoint(name) is None
        hint = " (a preset name: add --from-scratch to train it from random weights)" if only_a_preset else ""
        raise FinetuneInputError(
            f"--model {name!r}: expected a folder saved with save_pretrained, a Hub model id or a published BiT "
            f"name{hint}. Loading failed: {error}"
        ) from error
    previous = _checkpoint_labels(name)
    if previous != list(id2label.values()):
        # Same number of classes but other labels (or unknown ones): the loaded head belongs to another task.
        zero_head_(model)
        logger.info(
            "New zero-initialised head for %d classes (the checkpoint's head had %s).",
            len(id2label),
            f"{len(previous)} classes" if previous is not None else "unknown labels",
        )
    return model
