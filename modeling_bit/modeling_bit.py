"""PyTorch BiT: ResNet-v2 with Group Normalization and Weight Standardization.

The network of "Big Transfer (BiT): General Visual Representation Learning" (Kolesnikov et al.), as docs/recipe.md
("Architecture") describes it. Parameter names are exactly those of stock `transformers`' BiT classes
(`bit.embedder.convolution.weight`, `bit.encoder.stages.0.layers.0.conv1.weight`, ...), so state dicts and saved
folders interchange with no mapping.

Read top to bottom: layers (weight-standardized conv, group norm + activation, stem), the pre-activation
bottleneck unit, stages, then the `PreTrainedModel` classes. Outside training, each convolution reuses its
standardized kernel until its weights change (`weight_standardization.StandardizedWeights`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithNoAttention,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

from .configuration_bit import GROUP_NORM_EPS, WEIGHT_STANDARDIZATION_EPS, BitConfig
from .weight_standardization import StandardizedWeights

# BiT downsamples by 32; smaller inputs leave the last stage nothing to see.
MIN_IMAGE_SIZE = 32
# Training on CPU: stages run channels-last until their feature maps are smaller than this, where group norm's
# backward costs more channels-last than the convolutions gain (README, "Speed"; benchmarks/benchmark_model.py).
CHANNELS_LAST_TRAINING_MIN_SIZE = 16


class DynamicPad2d(nn.Module):
    """TensorFlow 'SAME' padding for a strided window: pads so that output = ceil(input / stride)."""

    def __init__(self, kernel_size: int, stride: int, value: float = 0.0):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.value = value

    def _total_padding(self, size: int) -> int:
        return max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)

    def forward(self, hidden_state: Tensor) -> Tensor:
        pad_h = self._total_padding(hidden_state.shape[-2])
        pad_w = self._total_padding(hidden_state.shape[-1])
        if pad_h == 0 and pad_w == 0:
            return hidden_state
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        return F.pad(hidden_state, padding, value=self.value)


class WeightStandardizedConv2d(nn.Conv2d):
    """Bias-free convolution whose kernel is weight-standardized before use.

    `padding=None` is BiT's symmetric padding `(kernel_size - 1) // 2`; `"SAME"` is TensorFlow's, which is
    asymmetric (dynamic) for strided kernels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: str | None = None,
        eps: float = WEIGHT_STANDARDIZATION_EPS,
    ):
        dynamic = padding == "SAME" and stride > 1
        static_padding = 0 if dynamic else (kernel_size - 1) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=static_padding, bias=False)
        self.pad = DynamicPad2d(kernel_size, stride) if dynamic else None
        self.eps = eps
        self.standardized = StandardizedWeights()

    def train(self, mode: bool = True) -> WeightStandardizedConv2d:
        # `model.eval()` / `model.train()` start from fresh weights, even after edits the version counter
        # cannot see (through `weight.data`).
        self.standardized.clear()
        return super().train(mode)

    def standardized_weight(self) -> Tensor:
        """The standardized kernel, in the graph while the weights train, else cached."""
        return self.standardized.kernel(self, self.eps)

    def forward(self, hidden_state: Tensor) -> Tensor:
        if self.pad is not None:
            hidden_state = self.pad(hidden_state)
        return self.standardized.convolve(self, self.eps, hidden_state)


class BitGroupNormActivation(nn.GroupNorm):
    """Group Normalization followed by the config's activation: BiT's ReLU, in place."""

    def __init__(self, config: BitConfig, num_channels: int):
        super().__init__(config.num_groups, num_channels, eps=GROUP_NORM_EPS, affine=True)
        self.activation = None if config.hidden_act == "relu" else ACT2FN[config.hidden_act]

    def forward(self, hidden_state: Tensor) -> Tensor:
        hidden_state = F.group_norm(hidden_state, self.num_groups, self.weight, self.bias, self.eps)
        if self.activation is not None:
            return self.activation(hidden_state)
        # In place is safe: group norm's backward needs its input, not its output.
        return F.relu_(hidden_state)


class BitMaxPool2d(nn.Module):
    """The stem's 3x3 stride-2 max-pool over a zero-padded input.

    BiT pads with zeros, 1 on each side (docs/recipe.md, "Architecture"), then pools without padding. Configs
    with `global_padding="SAME"` leave that padding out, and `embedding_dynamic_padding` adds TensorFlow 'SAME'
    amounts of zeros after it, as stock transformers does. Pooling with its own padding pads with -inf instead,
    which differs at the border because the stem has no activation and its outputs can be negative; so in
    BiT's case the pool pads by itself and the windows that overlap the border then take the zero into account
    (a max with 0): BiT's result without materializing a padded copy of the stem output.
    """

    def __init__(self, config: BitConfig):
        super().__init__()
        self.zero_padding = 0 if config.global_padding == "SAME" else 1
        self.pad = DynamicPad2d(3, 2) if config.embedding_dynamic_padding else None

    def forward(self, hidden_state: Tensor) -> Tensor:
        if self.pad is not None or not self.zero_padding:
            if self.zero_padding:
                hidden_state = F.pad(hidden_state, (self.zero_padding,) * 4)
            if self.pad is not None:
                hidden_state = self.pad(hidden_state)
            return F.max_pool2d(hidden_state, kernel_size=3, stride=2)
        pooled = F.max_pool2d(hidden_state, kernel_size=3, stride=2, padding=1)
        height, width = hidden_state.shape[-2:]
        pooled[..., 0, :].clamp_(min=0)
        pooled[..., :, 0].clamp_(min=0)
        if height % 2:  # odd size: the last window also covers the far padding row
            pooled[..., -1, :].clamp_(min=0)
        if width % 2:
            pooled[..., :, -1].clamp_(min=0)
        return pooled


class BitEmbeddings(nn.Module):
    """Stem: weight-standardized 7x7 stride-2 convolution, then the zero-padded 3x3 stride-2 max-pool.

    (batch, num_channels, H, W) -> (batch, embedding_size, ~H/4, ~W/4). No norm or activation: the
    network is pre-activation, so the first unit normalizes its input.
    """

    def __init__(self, config: BitConfig):
        super().__init__()
        self.convolution = WeightStandardizedConv2d(
            config.num_channels,
            config.embedding_size,
            kernel_size=7,
            stride=2,
            padding=config.global_padding,
            eps=config.weight_standardization_eps,
        )
        self.pooler = BitMaxPool2d(config)

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.device.type != "cpu":
            return self.pooler(self.convolution(pixel_values))
        # On CPU, oneDNN runs the strided 7x7 convolution and the max-pool faster channels-last (README, "Speed").
        return self.pooler(self.convolution(pixel_values.contiguous(memory_format=torch.channels_last)))


class BitDropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_state: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_state
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (hidden_state.shape[0],) + (1,) * (hidden_state.ndim - 1)
        mask = hidden_state.new_empty(mask_shape).bernoulli_(keep_prob)
        return hidden_state * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class BitDownsampleConv(nn.Module):
    """Projection shortcut of a stage's first unit: weight-standardized 1x1 conv with the unit's stride."""

    def __init__(self, config: BitConfig, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv = WeightStandardizedConv2d(
            in_channels,
            out_channels,
            kernel_size=1,
            stride=stride,
            padding=config.global_padding,
            eps=config.weight_standardization_eps,
        )

    def forward(self, hidden_state: Tensor) -> Tensor:
        return self.conv(hidden_state)


class BitPreActivationBottleneckLayer(GradientCheckpointingLayer):
    """Pre-activation bottleneck unit (ResNet-v2), stride on the 3x3 convolution.

    pre = relu(GN(x)); shortcut = proj(pre) in a stage's first unit, else x;
    out = conv3(relu(GN(conv2(relu(GN(conv1(pre))))))) + shortcut.
    (batch, in_channels, H, W) -> (batch, out_channels, H / stride, W / stride).
    """

    def __init__(
        self,
        config: BitConfig,
        in_channels: int,
        out_channels: int,
        mid_channels: int,
        stride: int,
        is_first_layer: bool,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        ws = {"padding": config.global_padding, "eps": config.weight_standardization_eps}
        self.downsample = (
            BitDownsampleConv(config, in_channels, out_channels, stride=stride) if is_first_layer else None
        )
        self.norm1 = BitGroupNormActivation(config, in_channels)
        self.conv1 = WeightStandardizedConv2d(in_channels, mid_channels, 1, **ws)
        self.norm2 = BitGroupNormActivation(config, mid_channels)
        self.conv2 = WeightStandardizedConv2d(mid_channels, mid_channels, 3, stride=stride, **ws)
        self.norm3 = BitGroupNormActivation(config, mid_channels)
        self.conv3 = WeightStandardizedConv2d(mid_channels, out_channels, 1, **ws)
        self.drop_path = BitDropPath(drop_path_rate) if drop_path_rate > 0 else None

    def forward(self, hidden_state: Tensor) -> Tensor:
        preactivated = self.norm1(hidden_state)
        shortcut = self.downsample(preactivated) if self.downsample is not None else hidden_state
        residual = self.conv1(preactivated)
        residual = self.conv2(self.norm2(residual))
        residual = self.conv3(self.norm3(residual))
        if self.drop_path is not None:
            residual = self.drop_path(residual)
        # The conv output is not saved for backward, so adding in place is safe.
        return residual.add_(shortcut)


class BitStage(nn.Module):
    """A stage: `depth` units; the first changes the width (and the resolution, with `stride`)."""

    def __init__(
        self,
        config: BitConfig,
        in_channels: int,
        out_channels: int,
        mid_channels: int,
        stride: int,
        depth: int,
        drop_path_rates: list[float],
    ):
        super().__init__()
        self.layers = nn.Sequential(
            *(
                BitPreActivationBottleneckLayer(
                    config,
                    in_channels if index == 0 else out_channels,
                    out_channels,
                    mid_channels,
                    stride=stride if index == 0 else 1,
                    is_first_layer=index == 0,
                    drop_path_rate=drop_path_rates[index],
                )
                for index in range(depth)
            )
        )

    def forward(self, hidden_state: Tensor) -> Tensor:
        return self.layers(hidden_state)


class BitEncoder(nn.Module):
    """The four stages; all but the first halve the resolution."""

    def __init__(self, config: BitConfig):
        super().__init__()
        total_units = sum(config.depths)
        rates = [config.drop_path_rate * index / max(total_units - 1, 1) for index in range(total_units)]
        self.stages = nn.ModuleList()
        in_channels = config.embedding_size
        for stage_index, (depth, (out_channels, mid_channels)) in enumerate(zip(config.depths, config.stage_widths)):
            first_unit = sum(config.depths[:stage_index])
            self.stages.append(
                BitStage(
                    config,
                    in_channels,
                    out_channels,
                    mid_channels,
                    stride=1 if stage_index == 0 else 2,
                    depth=depth,
                    drop_path_rates=rates[first_unit : first_unit + depth],
                )
            )
            in_channels = out_channels

    @staticmethod
    def _training_layout(hidden_state: Tensor) -> Tensor:
        # Training on CPU (where the stem made the layout channels-last): oneDNN's convolutions, forward and
        # backward, are faster channels-last on large feature maps, but on small ones GroupNorm's backward is
        # slower there than the gain. Inference stays channels-last throughout. Elsewhere (CUDA) the layout stays
        # the caller's: channels-last throughout is what cuDNN's reduced-precision kernels want.
        if (
            hidden_state.device.type == "cpu"
            and torch.is_grad_enabled()
            and min(hidden_state.shape[-2:]) < CHANNELS_LAST_TRAINING_MIN_SIZE
            and hidden_state.is_contiguous(memory_format=torch.channels_last)
        ):
            return hidden_state.contiguous()
        return hidden_state

    def forward(
        self, hidden_state: Tensor, output_hidden_states: bool = False, return_dict: bool = True
    ) -> BaseModelOutputWithNoAttention | tuple:
        hidden_state = self._training_layout(hidden_state)
        hidden_states = (hidden_state,) if output_hidden_states else None
        for stage in self.stages:
            hidden_state = self._training_layout(stage(hidden_state))
            if output_hidden_states:
                hidden_states += (hidden_state,)
        if not return_dict:
            return tuple(value for value in (hidden_state, hidden_states) if value is not None)
        return BaseModelOutputWithNoAttention(last_hidden_state=hidden_state, hidden_states=hidden_states)


def _stock_class_for_variant(model_class: type, config) -> type | None:
    """Stock transformers' class of the same name, if `config` is a variant only stock transformers implements.

    `import modeling_bit` makes our classes answer for every `model_type="bit"` config, including the
    non-pre-activation and dilated backbones of ViT-hybrid and DPT-hybrid, which are not BiT. Handing those
    to stock transformers keeps such models working in a process that imported this package.
    """
    if not isinstance(config, BitConfig) or config.unsupported_by_preactivation_bit() is None:
        return None
    from transformers.models.bit import modeling_bit as stock_modeling_bit

    return getattr(stock_modeling_bit, model_class.__name__, None)


class BitPreTrainedModel(PreTrainedModel):
    config_class = BitConfig
    config: BitConfig
    base_model_prefix = "bit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["BitEmbeddings", "BitPreActivationBottleneckLayer"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As in transformers; a config only stock transformers builds is loaded with its class. Importing
        `modeling_bit` also makes published BiT names load (`"BiT-M-R101x3"`, see `modeling_bit.by_name`)."""
        stock_class = _stock_class_for_variant(cls, kwargs.get("config"))
        if stock_class is not None:
            return stock_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        # The Auto API and `load_backbone` (DPT-hybrid, ViT-hybrid) build models through here.
        stock_class = _stock_class_for_variant(cls, config)
        if stock_class is not None:
            return stock_class._from_config(config, **kwargs)
        return super()._from_config(config, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # The BiT fine-tuning protocol starts a new head at zero; upstream training is fine with it too.
            init.zeros_(module.weight)
            init.zeros_(module.bias)


class BitModel(BitPreTrainedModel):
    """The BiT backbone with the final pre-head GN + ReLU and global average pooling.

    pixel_values (batch, C, H, W) -> last_hidden_state (batch, hidden_sizes[-1], H/32, W/32) after the
    final norm, pooler_output (batch, hidden_sizes[-1], 1, 1); hidden_states: the stem output and each
    stage's output (before the final norm).
    """

    def __init__(self, config: BitConfig):
        unsupported = config.unsupported_by_preactivation_bit()
        if unsupported is not None:
            raise ValueError(
                f"{unsupported}: modeling_bit builds BiT networks only. Build this variant with stock "
                f"transformers' classes (AutoModel.from_config and AutoBackbone.from_config pick them for you)."
            )
        config.validate_network()
        super().__init__(config)
        self.embedder = BitEmbeddings(config)
        self.encoder = BitEncoder(config)
        self.norm = BitGroupNormActivation(config, config.hidden_sizes[-1])
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))
        self.post_init()

    def validate_pixel_values(self, pixel_values: Tensor | None) -> Tensor:
        """Check the input before any computation; cast floating inputs to the weights' dtype."""
        expected = (
            f"a float tensor of shape (batch, {self.config.num_channels}, height, width) scaled to [-1, 1], "
            f"height and width >= {MIN_IMAGE_SIZE}"
        )
        if not isinstance(pixel_values, Tensor):
            raise ValueError(f"pixel_values must be {expected}; got {type(pixel_values).__name__}.")
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be {expected}; got shape {tuple(pixel_values.shape)}.")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be {expected}; got dtype {pixel_values.dtype}. Integer images must be "
                "preprocessed first (the BiT image processor scales them to [-1, 1])."
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be {expected}; got {pixel_values.shape[1]} channels "
                f"(shape {tuple(pixel_values.shape)})."
            )
        if min(pixel_values.shape[-2:]) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"pixel_values must be {expected}; got {pixel_values.shape[-2]}x{pixel_values.shape[-1]}. "
                "Resize the images first (the BiT image processor does)."
            )
        return pixel_values.to(self.embedder.convolution.weight.dtype)

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        pixel_values = self.validate_pixel_values(pixel_values)

        embedding_output = self.embedder(pixel_values)
        encoder_outputs = self.encoder(embedding_output, output_hidden_states=output_hidden_states, return_dict=True)
        last_hidden_state = self.norm(encoder_outputs.last_hidden_state)
        pooled_output = self.pooler(last_hidden_state)

        if not return_dict:
            hidden = (encoder_outputs.hidden_states,) if output_hidden_states else ()
            return (last_hidden_state, pooled_output) + hidden
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled_output,
            hidden_states=encoder_outputs.hidden_states,
        )


class BitForImageClassification(BitPreTrainedModel):
    """BiT with a linear head on the pooled pre-logits.

    pixel_values (batch, C, H, W) -> logits (batch, num_labels). With `labels`, the loss follows
    `config.problem_type`: cross-entropy for integer class ids, binary cross-entropy on logits for
    multi-hot float targets (multi-label), mean squared error for `num_labels == 1` (regression).
    """

    def __init__(self, config: BitConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bit = BitModel(config)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity(),
        )
        self.post_init()

    def forward(
        self,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.bit(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None

        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class BitBackbone(BackboneMixin, BitPreTrainedModel):
    """Multi-scale feature extractor (e.g. for detection or segmentation heads).

    Returns the feature maps of `config.out_features` among "stem" (batch, embedding_size, H/4, W/4) and
    "stage1".."stage4" (batch, hidden_sizes[i], H/4/2^i, W/4/2^i), before the final norm.
    """

    has_attentions = False

    def __init__(self, config: BitConfig):
        super().__init__(config)
        self.bit = BitModel(config)
        self.num_features = [config.embedding_size] + list(config.hidden_sizes)
        self.post_init()

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        pixel_values = self.bit.validate_pixel_values(pixel_values)
        embedding_output = self.bit.embedder(pixel_values)
        hidden_states = self.bit.encoder(embedding_output, output_hidden_states=True, return_dict=True).hidden_states
        feature_maps = tuple(
            hidden_states[index] for index, stage in enumerate(self.stage_names) if stage in self.out_features
        )
        if not return_dict:
            return (feature_maps, hidden_states) if output_hidden_states else (feature_maps,)
        return BackboneOutput(
            feature_maps=feature_maps,
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=None,
        )


__all__ = ["BitBackbone", "BitForImageClassification", "BitModel", "BitPreTrainedModel"]
