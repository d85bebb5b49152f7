"""The network to fine-tune: a checkpoint with a head for the task's labels, or a random initialisation.

BiT's protocol starts the new task's head at zero (docs/recipe.md "BiT-HyperRule": "A new task's head starts
at zero"). `load_model_for_labels` keeps a checkpoint's head only when the checkpoint was trained on exactly the
same labels; otherwise the head is new and zero. Weights are loaded in float32 whatever the checkpoint's dtype:
they are the master weights that mixed precision (`--bf16`, `--fp16`) computes from.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence

import torch
from safetensors import SafetensorError
from transformers import AutoConfig

from modeling_bit import BitConfig, BitForImageClassification, canonical_preset_name
from modeling_bit.by_name import resolve_pretrained_name
from modeling_bit.published import find_published_checkpoint

from .errors import FinetuneInputError
from .progress import transformers_quiet

logger = logging.getLogger(__name__)


# bit-finetune trains single-label classifiers (softmax cross-entropy); a checkpoint pretrained multi-label
# (`--multi-label`, sigmoid loss) says so in its config and would otherwise keep that loss.
SINGLE_LABEL = "single_label_classification"
# Loading a checkpoint that is not a BiT model fails in several ways inside transformers (no such file, an
# unknown or foreign config, mismatched weights, a corrupt safetensors header, a pickle that `weights_only`
# refuses to run); all mean "this is not a BiT checkpoint I can load".
LOADING_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, pickle.UnpicklingError)


def label_maps(label_names: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    id2label = {index: str(name) for index, name in enumerate(label_names)}
    return id2label, {name: index for index, name in id2label.items()}


def resolve_model_name(name: str) -> str:
    """Where `--model` is read from, decided before any network request where the name says it: a local path
    as it is; a preset name that is no published checkpoint is refused (it names an architecture, not
    weights); a published BiT name becomes its converted folder unless a Hub repository of that name exists
    (one query, `modeling_bit.by_name.resolve_pretrained_name`); anything else is a Hub id."""
    if os.path.exists(name):
        return name
    if canonical_preset_name(name) is not None and find_published_checkpoint(name) is None:
        raise FinetuneInputError(
            f"--model {name!r} is a preset name: it names an architecture, not trained weights. Add --from-scratch "
            "to train it from random weights, or give a checkpoint (a folder, a Hub id or a published BiT name such "
            "as BiT-M-R50x1)."
        )
    return str(resolve_pretrained_name(name))


def checkpoint_config(model_name_or_path: str):
    """The checkpoint's config, or None if it has none readable; a clear error if it is the config of
    another architecture."""
    try:
        with transformers_quiet(errors_only=True):
            config = AutoConfig.from_pretrained(str(model_name_or_path))
    except LOADING_ERRORS:
        return None
    if config.model_type != BitConfig.model_type:
        raise FinetuneInputError(
            f"--model {str(model_name_or_path)!r}: expected a BiT checkpoint (config.json with model_type "
            f"{BitConfig.model_type!r}), but its config is model_type {config.model_type!r} "
            f"({type(config).__name__}). bit-finetune fine-tunes BiT (ResNet-v2 with GroupNorm and Weight "
            "Standardization) models only."
        )
    return config


def _labels_of(config) -> list[str] | None:
    id2label = (config.id2label or {}) if config is not None else {}
    return [id2label[key] for key in sorted(id2label)] if id2label else None


def zero_head_(model: BitForImageClassification) -> None:
    head = model.classifier[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()


def load_model_for_labels(
    model_name_or_path: str | os.PathLike,
    label_names: Sequence[str],
    *,
    from_scratch: bool = False,
    seed: int | None = None,
    problem_type: str = SINGLE_LABEL,
    announce: bool = True,
) -> BitForImageClassification:
    """A BiT classifier for `label_names`, from a checkpoint (with a new zero head unless the checkpoint
    has exactly these labels) or, with `from_scratch`, randomly initialised (from `seed`, when given) with
    the architecture of a preset name (`bit-tiny`, `BiT-M-R50x1`, ...) or of a checkpoint's config.

    The config's `problem_type` is set to `problem_type` (the fine-tuning data's, single-label by
    default), whatever the checkpoint was pretrained with. `announce` logs a replaced head and loss.
    """
    id2label, label2id = label_maps(label_names)
    name = str(model_name_or_path)
    # num_labels follows id2label
    settings = {"id2label": id2label, "label2id": label2id, "problem_type": problem_type}
    if from_scratch:
        if canonical_preset_name(name) is not None:
            config = BitConfig.from_preset(name, **settings)
        else:
            if checkpoint_config(name) is None:
                raise FinetuneInputError(
                    f"--model {name!r}: with --from-scratch, expected a BiT preset name ({', '.join(BitConfig.preset_names())}) "
                    "or a folder with a BiT config.json."
                )
            config = BitConfig.from_pretrained(name, **settings)
        if seed is not None:
            torch.manual_seed(seed)
        return BitForImageClassification(config)
    source = resolve_model_name(name)
    previous = checkpoint_config(source)
    try:
        with transformers_quiet(errors_only=True):
            model = BitForImageClassification.from_pretrained(
                source, ignore_mismatched_sizes=True, dtype=torch.float32, **settings
            )
    except LOADING_ERRORS as error:
        raise FinetuneInputError(
            f"--model {name!r}: expected a BiT checkpoint: a folder saved with save_pretrained, a Hub model id or a "
            f"published BiT name. Loading failed: {type(error).__name__}: {error}"
        ) from error
    if announce and previous is not None and previous.problem_type not in (None, problem_type):
        logger.info(
            "The checkpoint was trained as %s; fine-tuning as %s (its loss and head follow the new task).",
            previous.problem_type,
            problem_type,
        )
    labels = _labels_of(previous)
    if labels != list(id2label.values()):
        # Same number of classes but other labels (or unknown ones): the loaded head belongs to another task.
        zero_head_(model)
        if announce:
            logger.info(
                "New zero-initialised head for %d classes (the checkpoint's head had %s).",
                len(id2label),
                f"{len(labels)} classes" if labels is not None else "unknown labels",
            )
    return model
