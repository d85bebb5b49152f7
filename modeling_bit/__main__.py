"""Quick model demo: `python -m modeling_bit [--preset bit-tiny] [--image PATH] [--resolution 128]`.

Builds a BiT network by preset name (random weights), preprocesses an image the BiT way and prints the
network's size, output shapes and inference time. Without `--image` it uses a generated image.
"""

import argparse
import time

import numpy as np
import torch
from PIL import Image

from . import BitConfig, BitForImageClassification, bit_image_processor, load_rgb_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bit-tiny", help=f"one of: {', '.join(BitConfig.preset_names())}")
    parser.add_argument("--image", help="an image file (default: a generated gradient image)")
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()

    config = BitConfig.from_preset(args.preset)
    model = BitForImageClassification(config).eval()
    if args.image:
        image = load_rgb_image(args.image)
    else:
        ramp = np.linspace(0, 255, args.resolution, dtype=np.uint8)
        image = Image.fromarray(np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128), axis=-1).astype(np.uint8))
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


if __name__ == "__main__":
    main()
