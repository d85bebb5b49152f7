"""BiT (Big Transfer) for the Hugging Face stack.

Importing this package registers our classes with transformers' Auto API for `model_type = "bit"`, so
`AutoModel.from_pretrained(...)` and `AutoModelForImageClassification.from_pretrained(...)` return them.
"""

from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .by_name import route_through_published_names
from .configuration_bit import PRESETS, BitConfig, canonical_preset_name
from .image_processing_bit import BIT_IMAGE_MEAN, BIT_IMAGE_STD, bit_image_processor, load_rgb_image
from .modeling_bit import BitBackbone, BitForImageClassification, BitModel, BitPreTrainedModel
from .published import PUBLISHED_CHECKPOINT_NAMES

# "bit" is a built-in model type, hence exist_ok: ours replace stock transformers' for this process.
AutoConfig.register("bit", BitConfig, exist_ok=True)
AutoModel.register(BitConfig, BitModel, exist_ok=True)
AutoModelForImageClassification.register(BitConfig, BitForImageClassification, exist_ok=True)
AutoBackbone.register(BitConfig, BitBackbone, exist_ok=True)
# `BitModel.from_pretrained("BiT-M-R50x1")`, `AutoModel.from_pretrained("BiT-M-R50x1")`: published BiT names
# resolve to converted checkpoints.
route_through_published_names(
    BitPreTrainedModel, AutoConfig, AutoModel, AutoModelForImageClassification, AutoImageProcessor
)

__all__ = [
    "BIT_IMAGE_MEAN",
    "BIT_IMAGE_STD",
    "PRESETS",
    "PUBLISHED_CHECKPOINT_NAMES",
    "BitBackbone",
    "BitConfig",
    "BitForImageClassification",
    "BitModel",
    "BitPreTrainedModel",
    "bit_image_processor",
    "canonical_preset_name",
    "load_rgb_image",
]
