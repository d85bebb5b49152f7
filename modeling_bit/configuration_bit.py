"""BiT configuration, and the presets: the networks of the variant table (`variants.py`) by name.

The architecture facts (stage depths, widths, normalization constants) are the BiT paper's, as docs/recipe.md
("Architecture") lists them. The serialized form is the one stock `transformers.BitConfig` reads, so a folder we
save loads in stock transformers too.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneConfigMixin

from .variants import (
    PUBLISHED_ARCHITECTURES,
    PUBLISHED_CHECKPOINTS,
    RESNET_DEPTHS,
    RESNET_HIDDEN_SIZES,
    RESNET_STEM_CHANNELS,
    SMALL_NETWORKS,
)

GROUP_NORM_EPS = 1e-5  # docs/recipe.md "Architecture": Group Normalization eps 1e-5
WEIGHT_STANDARDIZATION_EPS = 1e-10  # docs/recipe.md "Architecture": added to the population variance

# Every published checkpoint's network with its head, then the small networks.
PRESETS: dict[str, dict] = {
    **{
        name: {**row.architecture.config_fields(), "num_labels": row.num_labels}
        for name, row in PUBLISHED_CHECKPOINTS.items()
    },
    **SMALL_NETWORKS,
}
_PRESETS_BY_LOWER_NAME = {name.lower(): name for name in PRESETS}


def rounded_width(channels: float, divisor: int = 8) -> int:
    """A channel count rounded as stock transformers rounds its BiT stage and bottleneck widths: to the nearest
    multiple of `divisor` (halves up), at least `divisor`, and one step up if that lost more than 10%. BiT's own
    widths (multiples of 32, bottlenecks a quarter of them) are unchanged by it."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _first_dilated_stage(num_stages: int, output_stride: int) -> int | None:
    """The first stage stock transformers dilates instead of striding: the stem reduces by 4, every stage after the
    first by 2 more, and a stage whose input is already reduced by `output_stride` keeps its resolution."""
    reduction = 4
    for stage in range(num_stages):
        if reduction >= output_stride:
            return stage
        reduction *= 1 if stage == 0 else 2
    return None


def _is_positive_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _overridable_fields(config_class: type) -> set[str]:
    # Config fields, plus the keyword arguments PretrainedConfig and the backbone mixin take.
    return {field.name for field in dataclasses.fields(config_class)} | {"num_labels", "out_features", "out_indices"}


def canonical_preset_name(name: str) -> str | None:
    """The table spelling of a preset name (`bit-m-r101x3` -> `BiT-M-R101x3`), or None if unknown."""
    return _PRESETS_BY_LOWER_NAME.get(name.strip().lower())


class BitConfig(BackboneConfigMixin, PretrainedConfig):
    r"""Configuration of a BiT (ResNet-v2 with Group Normalization and Weight Standardization) network.

    The JSON it writes is the one stock `transformers.BitConfig` reads (`model_type = "bit"`, the format of
    [google/bit-50](https://huggingface.co/google/bit-50)), and it reads every config stock transformers reads:
    once `modeling_bit` is imported this class stands in for stock `BitConfig`.

    Args:
        num_channels (`int`, defaults to 3): input image channels.
        embedding_size (`int`, defaults to 64): output channels of the 7x7 stem convolution.
        hidden_sizes (`list[int]`, defaults to `[256, 512, 1024, 2048]`): output channels of each stage; the
            bottleneck width of a stage is a quarter of it. Both are rounded as stock transformers rounds them
            (`rounded_width`: to a multiple of 8), which leaves BiT's multiples of 32 as they are.
        depths (`list[int]`, defaults to `[3, 4, 6, 3]`): units per stage.
        width_factor (`int`, defaults to 1): multiplies every channel count, stem included. It is folded
            into `embedding_size` and `hidden_sizes` at construction and then reads 1, so the saved
            config describes the same network in stock transformers (whose own `width_factor` leaves
            the stem and final norm narrow and crashes for values above 1).
        num_groups (`int`, defaults to 32): Group Normalization groups; must divide every channel count.
        weight_standardization_eps (`float`, defaults to 1e-10): added to each filter's variance.
        hidden_act (`str`, defaults to `"relu"`): the activation after each Group Normalization (BiT: ReLU).
        global_padding (`str`, *optional*): `None` for BiT's symmetric padding, or `"SAME"` for
            TensorFlow-style dynamic padding as in some stock-transformers checkpoints (stock's `"VALID"` is read
            too; stock transformers' classes build it).
        embedding_dynamic_padding (`bool`, defaults to `False`): TensorFlow-style dynamic padding before
            the stem max-pool (after BiT's zero padding of 1, unless `global_padding="SAME"`).
        drop_path_rate (`float`, defaults to 0.0): stochastic depth rate, increasing linearly over units.
        out_features / out_indices: stages the backbone returns (`"stem"`, `"stage1"` ... `"stage4"`).
    """

    model_type = "bit"

    num_channels: int = 3
    embedding_size: int = RESNET_STEM_CHANNELS
    hidden_sizes: list[int] | tuple[int, ...] = RESNET_HIDDEN_SIZES
    depths: list[int] | tuple[int, ...] = RESNET_DEPTHS[50]
    width_factor: int = 1
    num_groups: int = 32
    weight_standardization_eps: float = WEIGHT_STANDARDIZATION_EPS
    layer_type: str = "preactivation"
    hidden_act: str = "relu"
    global_padding: str | None = None
    embedding_dynamic_padding: bool = False
    drop_path_rate: float = 0.0
    output_stride: int = 32

    def __post_init__(self, **kwargs):
        self._check_integer_sizes()
        self.hidden_sizes = [int(size) * self.width_factor for size in self.hidden_sizes]
        self.embedding_size = int(self.embedding_size) * self.width_factor
        self.width_factor = 1
        self.depths = [int(depth) for depth in self.depths]
        if self.global_padding is not None:
            self.global_padding = self.global_padding.upper()
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_features=kwargs.pop("out_features", None), out_indices=kwargs.pop("out_indices", None)
        )
        kwargs.pop("stage_names", None)  # derived from depths, written for stock transformers' sake
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def _check_integer_sizes(self) -> None:
        # Before folding the width in: `int()` would silently truncate 1.5 units or a width of 2.5.
        for name in ("width_factor", "embedding_size", "num_channels", "num_groups"):
            value = getattr(self, name)
            if not _is_positive_integer(value):
                raise ValueError(f"{name}={value!r}: expected a positive integer.")
        for name in ("depths", "hidden_sizes"):
            values = getattr(self, name)
            if (
                isinstance(values, (str, bytes))
                or not values
                or not all(_is_positive_integer(value) for value in values)
            ):
                raise ValueError(f"{name}={values!r}: expected a list of positive integers, one per stage.")

    def validate_architecture(self) -> None:
        """Raise `ValueError` for values no BiT config may hold, whatever builds the network.

        As lenient as stock `BitConfig`, whose folders this class must read: stock transformers'
        non-pre-activation variant (`layer_type="bottleneck"`, the ViT/DPT-hybrid backbone), dilated variants
        (`output_stride` below 32) and any width it rounds are valid configs. Whether a network can be built from
        them is `validate_network`'s question, asked when one is built.
        """
        if self.layer_type not in ("preactivation", "bottleneck"):
            raise ValueError(f"layer_type={self.layer_type!r}: expected 'preactivation' (BiT) or 'bottleneck'.")
        if self.global_padding not in (None, "SAME", "VALID"):
            raise ValueError(f"global_padding={self.global_padding!r}: expected None (BiT), 'SAME' or 'VALID'.")
        if self.weight_standardization_eps <= 0:
            raise ValueError(f"weight_standardization_eps={self.weight_standardization_eps}: expected > 0.")

    @property
    def stage_widths(self) -> list[tuple[int, int]]:
        """(output channels, bottleneck channels) of each stage, as stock transformers builds them: `hidden_sizes`
        and a quarter of each, rounded (`rounded_width`). Stages are paired with `depths`; extra entries of
        `hidden_sizes` build nothing (stock's hybrid backbones list four and build fewer)."""
        widths = []
        for _, hidden_size in zip(self.depths, self.hidden_sizes):
            out_channels = rounded_width(hidden_size)
            widths.append((out_channels, rounded_width(out_channels * 0.25)))
        return widths

    def validate_network(self) -> None:
        """Raise `ValueError` if no implementation can build a network from these values."""
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r}: expected an activation name such as 'relu' (BiT).")
        channel_counts = [self.embedding_size, self.hidden_sizes[-1]]
        channel_counts += [count for widths in self.stage_widths for count in widths]
        indivisible = sorted({count for count in channel_counts if count % self.num_groups})
        if indivisible:
            raise ValueError(
                f"num_groups={self.num_groups} must divide every channel count of the network, but does not divide "
                f"{indivisible}. Choose a group count that divides {math.gcd(*channel_counts)}."
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate}: expected a value in [0, 1).")

    def unsupported_by_preactivation_bit(self) -> str | None:
        """Why our (BiT: pre-activation, undilated, padded) classes cannot build this config, or None if they can.

        Our model classes hand such configs to stock transformers' classes, which build them as they always did.
        """
        if self.layer_type != "preactivation":
            return f"layer_type={self.layer_type!r} (BiT is a pre-activation ResNet-v2)"
        dilated = _first_dilated_stage(len(self.depths), self.output_stride)
        if dilated is not None:
            return f"output_stride={self.output_stride} (stage{dilated + 1} would be dilated; BiT does not dilate)"
        if self.global_padding == "VALID":
            return "global_padding='VALID' (unpadded 3x3 convolutions, which shrink the residual branch)"
        last_stage_channels = self.stage_widths[-1][0]
        if last_stage_channels != self.hidden_sizes[-1]:
            return (
                f"hidden_sizes {self.hidden_sizes}: the last stage is {last_stage_channels} channels wide (rounded to "
                f"a multiple of 8) but the final norm and head expect {self.hidden_sizes[-1]}"
            )
        return None

    @property
    def num_features(self) -> int:
        """Channels of the pooled pre-logits (the classifier's input)."""
        return self.hidden_sizes[-1]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> BitConfig:
        """Build the configuration of a named BiT architecture.

        `name` is one of `BitConfig.preset_names()` (case-insensitive: `"bit-m-r101x3"` works). `overrides`
        are config fields applied on top of the preset, e.g.
        `BitConfig.from_preset("bit-tiny", width_factor=3, num_labels=7)` is the tiny network three
        times as wide with a 7-class head.
        """
        canonical = canonical_preset_name(name) if isinstance(name, str) else None
        if canonical is None:
            raise ValueError(f"Unknown BiT preset {name!r}. Valid names: {', '.join(PRESETS)}.")
        unknown = sorted(set(overrides) - _overridable_fields(cls))
        if unknown:
            raise ValueError(
                f"Unknown BitConfig field(s) {unknown} in the overrides of preset {canonical!r}. "
                f"Valid fields: {', '.join(sorted(_overridable_fields(cls)))}."
            )
        fields = {**PRESETS[canonical], **overrides}
        num_labels = fields.pop("num_labels")
        if not _is_positive_integer(num_labels):
            raise ValueError(f"num_labels={num_labels!r}: expected a positive integer.")
        if fields.get("id2label") is None:
            fields["num_labels"] = num_labels
        config = cls(**fields)
        config.validate_network()  # an override that builds no network is refused now, not when a model is built
        return config

    @staticmethod
    def preset_names() -> list[str]:
        return list(PRESETS)


__all__ = [
    "PUBLISHED_ARCHITECTURES",
    "RESNET_DEPTHS",
    "BitConfig",
    "PRESETS",
    "canonical_preset_name",
    "rounded_width",
]
