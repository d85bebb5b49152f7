"""The network and its loss: the model of a preset for the run's labels, the upstream loss, the head init."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling_bit import BitConfig, BitForImageClassification


def upstream_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, multi_label: bool
) -> torch.Tensor:
    """Mean over the readable examples of the per-example upstream loss.

    Single-label: softmax cross-entropy. Multi-label: per-class sigmoid cross-entropy summed over classes
    (docs/recipe.md "Upstream pre-training": JFT's per-class binary loss). Summing over classes keeps each
    class's gradient independent of the number of classes; a mean would shrink it 21,843-fold on
    ImageNet-21k. `weights` is 1 for readable images and 0 for the blanks that stand in for unreadable ones.
    """
    logits = logits.float()
    if multi_label:
        per_example = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").sum(dim=1)
    else:
        per_example = F.cross_entropy(logits, labels, reduction="none")
    return (per_example * weights).sum() / weights.sum().clamp(min=1.0)


def init_multi_label_head(model, bias: float) -> None:
    """Start every class at sigmoid(bias) (docs/recipe.md: e.g. -10), so the initial sigmoid loss is sane."""
    with torch.no_grad():
        model.classifier[-1].bias.fill_(bias)


def build_model(
    preset: str,
    labels,
    multi_label_head_bias: float,
    *,
    gradient_checkpointing: bool = False,
    channels_last: bool = False,
) -> BitForImageClassification:
    """A freshly initialised network of `preset` with a head for `labels` (a `data.LabelSpace`)."""
    config = BitConfig.from_preset(
        preset,
        id2label=dict(enumerate(labels.names)),
        label2id={name: index for index, name in enumerate(labels.names)},
        problem_type="multi_label_classification" if labels.multi_label else "single_label_classification",
    )
    model = BitForImageClassification(config)
    if labels.multi_label:
        init_multi_label_head(model, multi_label_head_bias)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
