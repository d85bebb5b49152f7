"""Quick model demo: `python -m modeling_bit [--preset bit-tiny] [--image PATH] [--resolution 128]`.

Builds a BiT network by preset name (random weights), preprocesses an image the BiT way and prints the
network's size, output shapes and inference time. Without `--image` it uses a generated image.
"""

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import HfArgumentParser

from . import BitConfig, BitForImageClassification, bit_image_processor, load_rgb_image
from .image_processing_bit import UnreadableImageError
from .modeling_bit import MIN_IMAGE_SIZE


@dataclass
class DemoArguments:
    preset: str = field(default="bit-tiny", metadata={"help": f"one of: {', '.join(BitConfig.preset_names())}"})
    image: str | None = field(default=None, metadata={"help": "an image file (default: a generated gradient image)"})
    resolution: int = field(default=128, metadata={"help": f"square input side, at least {MIN_IMAGE_SIZE}"})


def gradient_image(size: int) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128), axis=-1).astype(np.uint8))


def run_demo(args: DemoArguments) -> None:
    if args.resolution < MIN_IMAGE_SIZE:
        raise ValueError(
            f"--resolution {args.resolution}: expected at least {MIN_IMAGE_SIZE} (BiT downsamples by 32)."
        )
    config = BitConfig.from_preset(args.preset)
    image = load_rgb_image(args.image) if args.image else gradient_image(args.resolution)
    model = BitForImageClassification(config).eval()
    pixel_values = bit_image_processor(args.resolution)(image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        model(pixel_values)  # first call standardizes and prepacks the weights
        start = time.perf_counter()
        output = model(pixel_values, output_hidden_states=True)
        elapsed = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {parameters:,} parameters, depths {config.depths}, widths {config.hidden_sizes}")
    print(f"input {tuple(pixel_values.shape)} in [{pixel_values.min():.2f}, {pixel_values.max():.2f}]")
    for name, hidden in zip(config.stage_names, output.hidden_states):
        print(f"  {name:<7} {tuple(hidden.shape)}")
    print(f"logits {tuple(output.logits.shape)} in {elapsed * 1000:.1f} ms (random weights: the scores mean nothing)")


def main() -> None:
    (args,) = HfArgumentParser(DemoArguments, description=__doc__).parse_args_into_dataclasses()
    try:
        run_demo(args)
    except (ValueError, UnreadableImageError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
