"""The networks benchmarks/benchmark_gpu.py compares, all holding the same weights, and their parity check.

- `ours`: `modeling_bit.BitForImageClassification` of a preset, random weights (norms and head randomized too,
  so that logit parity means something);
- `floor`: the same network with every weight-standardized convolution replaced by a plain one holding the
  standardized kernel: what the network costs without any standardization (its lower bound);
- `stock`: stock transformers' `BitForImageClassification`, which reads our state dict as is (README, "Models");
- `timm`: timm's ResNetV2-BiT (`resnetv2_50x1_bit`, ...), given our weights through `timm_state_dict`.

Stock and timm standardize with eps 1e-8, ours with BiT's 1e-10 (docs/recipe.md, "Architecture"); both get ours
here, so that all four compute the same function and parity can be tight.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from modeling_bit import BitConfig, BitForImageClassification
from modeling_bit.modeling_bit import WeightStandardizedConv2d
from modeling_bit.weight_standardization import standardize_weight

# timm's names of the published BiT architectures; presets without one (bit-tiny) get timm's ResNetV2 class built
# to the preset's widths.
TIMM_NAMES = {
    "BiT-S-R50x1": "resnetv2_50x1_bit",
    "BiT-M-R101x3": "resnetv2_101x3_bit",
    "BiT-M-R152x4": "resnetv2_152x4_bit",
}
NUM_LABELS = 1000  # an ImageNet head
# Logits of another implementation against ours, max |difference| over max |ours| (the bounds).
PARITY_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}

_OUR_TO_TIMM_NAMES = [
    (re.compile(r"^bit\.embedder\.convolution\.weight$"), "stem.conv.weight"),
    (re.compile(r"^bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$"), r"stages.\1.blocks.\2.\3"),
    (re.compile(r"^bit\.norm\.(weight|bias)$"), r"norm.\1"),
    (re.compile(r"^classifier\.1\.(weight|bias)$"), r"head.fc.\1"),
]


def timm_is_installed() -> bool:
    return importlib.util.find_spec("timm") is not None


def timm_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict (stock transformers' names) under timm ResNetV2's names. timm's head is a 1x1 convolution
    (its `ClassifierHead(use_conv=True)`), so the linear head's (classes, features) weight gains two unit dims."""
    mapped = {}
    for name, value in state.items():
        for pattern, replacement in _OUR_TO_TIMM_NAMES:
            if pattern.match(name):
                mapped[pattern.sub(replacement, name)] = (
                    value[:, :, None, None] if name == "classifier.1.weight" else value
                )
                break
        else:
            raise KeyError(f"{name}: not a parameter of a BiT classifier, no timm name for it")
    return mapped


def build_ours(preset: str, device: torch.device, seed: int = 0) -> BitForImageClassification:
    """A randomly initialised classifier of `preset` on `device` (initialised there: fast on a GPU)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = BitForImageClassification(BitConfig.from_preset(preset, num_labels=NUM_LABELS))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "classifier" in name:
                parameter.normal_(1.0 if name.endswith("weight") and "norm" in name else 0.0, 0.1)
    return model.eval()


class PrestandardizedConv2d(nn.Conv2d):
    """A plain convolution holding the standardized kernel of a `WeightStandardizedConv2d`, computed once."""

    def __init__(self, source: WeightStandardizedConv2d):
        weight = source.weight
        super().__init__(
            source.in_channels,
            source.out_channels,
            source.kernel_size,
            stride=source.stride,
            padding=source.padding,
            bias=False,
            device=weight.device,
            dtype=weight.dtype,
        )
        self.pad = source.pad
        with torch.no_grad():
            self.weight.copy_(standardize_weight(weight, source.eps))

    def forward(self, hidden_state: Tensor) -> Tensor:
        if self.pad is not None:
            hidden_state = self.pad(hidden_state)
        return super().forward(hidden_state)


def build_floor(ours: BitForImageClassification) -> BitForImageClassification:
    """`ours` with pre-standardized plain convolutions: the same network, no standardization at run time."""
    floor = copy.deepcopy(ours)
    for name, module in list(floor.named_modules()):
        if isinstance(module, WeightStandardizedConv2d):
            parent, _, attribute = name.rpartition(".")
            setattr(floor.get_submodule(parent), attribute, PrestandardizedConv2d(module))
    return floor


def build_stock(ours: BitForImageClassification) -> nn.Module:
    """Stock transformers' classifier with our weights and our standardization eps."""
    device = ours.device
    with torch.device(device):
        stock = transformers.BitForImageClassification(transformers.BitConfig(**ours.config.to_dict()))
    stock.load_state_dict(ours.state_dict(), strict=True)
    from transformers.models.bit.modeling_bit import WeightStandardizedConv2d as StockWeightStandardizedConv2d

    for module in stock.modules():
        if isinstance(module, StockWeightStandardizedConv2d):
            module.eps = ours.config.weight_standardization_eps
    return stock.eval()


def build_timm(ours: BitForImageClassification, preset: str) -> nn.Module:
    """timm's ResNetV2-BiT of `preset` with our weights and our standardization eps."""
    from functools import partial

    import timm
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    config = ours.config
    with torch.device(ours.device):
        if preset in TIMM_NAMES:
            model = timm.create_model(TIMM_NAMES[preset], pretrained=False, num_classes=NUM_LABELS)
        else:  # timm's BiT recipe (the "fixed" stem, StdConv2d, GroupNormAct) at the preset's widths
            model = ResNetV2(
                layers=list(config.depths),
                channels=list(config.hidden_sizes),
                stem_chs=config.embedding_size,
                stem_type="fixed",
                conv_layer=partial(StdConv2d, eps=config.weight_standardization_eps),
                norm_layer=partial(GroupNormAct, num_groups=config.num_groups),
                num_classes=NUM_LABELS,
            )
    model.load_state_dict(timm_state_dict(ours.state_dict()), strict=True)
    for module in model.modules():
        if isinstance(module, StdConv2d):
            module.eps = config.weight_standardization_eps
    return model.eval()


def build_networks(preset: str, device: torch.device, with_timm: bool) -> dict[str, nn.Module]:
    ours = build_ours(preset, device)
    networks = {"ours": ours, "floor": build_floor(ours), "stock": build_stock(ours)}
    if with_timm:
        networks["timm"] = build_timm(ours, preset)
    return networks


def logits_of(model: nn.Module, pixel_values: Tensor) -> Tensor:
    output = model(pixel_values)
    return output.logits if hasattr(output, "logits") else output


def relative_difference(other: Tensor, reference: Tensor) -> float:
    other, reference = other.float(), reference.float()
    return ((other - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


def autocast_for(precision: str, device: torch.device):
    """bf16: autocast with float32 master weights (what --bf16 / --mixed-precision bf16 run); fp32: plain."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def check_parity(networks: dict[str, nn.Module], pixel_values: Tensor) -> dict[str, dict[str, float]]:
    """Each other network's logits against ours, in float32 (TF32 off: it rounds convolution inputs to 10 bits)
    and under bf16 autocast. Returns {network: {precision: relative difference}}."""
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        differences = {name: {} for name in networks if name != "ours"}
        for precision in PARITY_TOLERANCE:
            with torch.inference_mode(), autocast_for(precision, pixel_values.device):
                logits = {name: logits_of(model.eval(), pixel_values) for name, model in networks.items()}
            for name in differences:
                differences[name][precision] = relative_difference(logits[name], logits["ours"])
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    return differences


def parity_failures(parity: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The differences over their bound, from {scenario: `check_parity`'s result}."""
    return [
        f"{scenario} {name} {precision}: {value:.1e} > {PARITY_TOLERANCE[precision]:.0e}"
        for scenario, differences in parity.items()
        for name, by_precision in differences.items()
        for precision, value in by_precision.items()
        if not value <= PARITY_TOLERANCE[precision]
    ]


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The same loss for every network (stock and ours would compute it from `labels`, timm has none)."""
    return F.cross_entropy(logits.float(), labels)
