"""Does an upstream checkpoint transfer? Digits, pre-trained vs the same network from random init.

    python pretraining/transfer_check.py [--checkpoint FOLDER] [--image-size 64] [--finetune-steps 150]

scikit-learn's digits (1,797 handwritten 8x8 digits; needs the `dev` extra) upscaled to --image-size,
600 held out for testing. Two protocols, each for the checkpoint and for the same architecture from
random initialisation:

- linear probe: ridge regression on the frozen pre-logits with 1, 5, 10 examples per class (median of 5
  draws) and with the whole training set;
- fine-tuning: --finetune-steps SGD steps (the BiT-HyperRule's lr, momentum and staircase decays from
  `finetune.hyperrule`, batch 64, zero head, random crop of a 1.25x resize + flip: the HyperRule's shape,
  shortened) on 10 per class and all.

A quick check of an upstream run; the fine-tuning package's main job is the full BiT-HyperRule comparison.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import HfArgumentParser

from finetune.hyperrule import DECAY_FACTOR, DECAY_FRACTIONS, LEARNING_RATE, SGD_MOMENTUM
from modeling_bit import BitConfig, BitForImageClassification, bit_image_processor
from pretraining import embedded_checkpoint_path
from pretraining.probe import fit_ridge_classifier
from pretraining.recipe import FEW_SHOT_EXAMPLES_PER_CLASS, FEW_SHOT_TRIALS

TEST_EXAMPLES = 600
FINETUNE_BATCH_SIZE = 64
FINETUNE_WARMUP_STEPS = 10
PRECROP_FACTOR = 1.25  # resize to 1.25x, then a random crop at the input size (160 -> 128 in the HyperRule)


@dataclasses.dataclass
class TransferCheckArguments:
    checkpoint: str | None = dataclasses.field(default=None, metadata={"help": "Default: the embedded checkpoint."})
    image_size: int = 64
    finetune_steps: int = 150
    seed: int = 0


def load_digits_images() -> tuple[list[Image.Image], np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((pixels / 16 * 255).astype(np.uint8)).convert("RGB") for pixels in digits.images]
    return images, digits.target


def balanced_subset(labels: np.ndarray, pool: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.choice(pool[labels[pool] == c], per_class, replace=False) for c in np.unique(labels)])


class DigitsTransfer:
    def __init__(self, checkpoint: Path, image_size: int, seed: int):
        self.checkpoint, self.image_size, self.seed = checkpoint, image_size, seed
        self.images, self.labels = load_digits_images()
        order = np.random.default_rng(seed).permutation(len(self.labels))
        self.test, self.train = order[:TEST_EXAMPLES], order[TEST_EXAMPLES:]
        self.test_pixels = self.pixels(self.test, image_size)

    def pixels(self, indices, size: int) -> torch.Tensor:
        return bit_image_processor(size)([self.images[i] for i in indices], return_tensors="pt")["pixel_values"]

    def model(self, pretrained: bool) -> BitForImageClassification:
        """The checkpoint with a new zero head for the 10 digits, or its architecture from random init."""
        digit_names = {"id2label": {i: str(i) for i in range(10)}, "label2id": {str(i): i for i in range(10)}}
        if pretrained:
            return BitForImageClassification.from_pretrained(
                self.checkpoint, ignore_mismatched_sizes=True, **digit_names
            )
        return BitForImageClassification(BitConfig.from_pretrained(self.checkpoint, **digit_names))

    @torch.no_grad()
    def features(self, model, pixels: torch.Tensor) -> np.ndarray:
        model.eval()
        return torch.cat([model.bit(chunk).pooler_output.flatten(1) for chunk in pixels.split(256)]).numpy()

    def probe(self, model) -> dict:
        train_features = self.features(model, self.pixels(self.train, self.image_size))
        test_features = self.features(model, self.test_pixels)
        results = {}
        for k in FEW_SHOT_EXAMPLES_PER_CLASS:
            accuracies = []
            for trial in range(FEW_SHOT_TRIALS):
                chosen = balanced_subset(
                    self.labels, np.arange(len(self.train)), k, np.random.default_rng([self.seed, k, trial])
                )
                predict = fit_ridge_classifier(train_features[chosen], self.labels[self.train][chosen], 10)
                accuracies.append(float(np.mean(predict(test_features) == self.labels[self.test])))
            results[f"probe_{k}_shot"] = float(np.median(accuracies))
        predict = fit_ridge_classifier(train_features, self.labels[self.train], 10)
        results["probe_full"] = float(np.mean(predict(test_features) == self.labels[self.test]))
        return results

    def finetune(self, model, per_class: int | None, steps: int) -> float:
        rng = np.random.default_rng([self.seed, per_class or 0])
        pool = self.train if per_class is None else balanced_subset(self.labels, self.train, per_class, rng)
        precrop = round(self.image_size * PRECROP_FACTOR)
        pixels, labels = self.pixels(pool, precrop), torch.tensor(self.labels[pool])
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=SGD_MOMENTUM)
        model.train()
        for step in range(steps):
            decays = sum(step >= fraction * steps for fraction in DECAY_FRACTIONS)
            warmup = min(1.0, (step + 1) / FINETUNE_WARMUP_STEPS)
            for group in optimizer.param_groups:
                group["lr"] = LEARNING_RATE * warmup * DECAY_FACTOR**decays
            batch = torch.from_numpy(rng.integers(0, len(pool), FINETUNE_BATCH_SIZE))
            top, left = rng.integers(0, precrop - self.image_size + 1, 2)
            inputs = pixels[batch][:, :, top : top + self.image_size, left : left + self.image_size]
            if rng.random() < 0.5:
                inputs = inputs.flip(3)
            F.cross_entropy(model(pixel_values=inputs).logits, labels[batch]).backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            predicted = torch.cat(
                [model(pixel_values=chunk).logits.argmax(1) for chunk in self.test_pixels.split(256)]
            )
        return float((predicted.numpy() == self.labels[self.test]).mean())

    def run(self, steps: int) -> dict:
        results = {}
        for name, pretrained in (("upstream", True), ("random_init", False)):
            torch.manual_seed(self.seed)
            row = self.probe(self.model(pretrained))
            for per_class in (10, None):
                torch.manual_seed(self.seed)
                row[f"finetune_{per_class or 'full'}"] = self.finetune(self.model(pretrained), per_class, steps)
            results[name] = row
        return results


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(TransferCheckArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else embedded_checkpoint_path()
    results = DigitsTransfer(checkpoint, args.image_size, args.seed).run(args.finetune_steps)
    print(f"digits at {args.image_size} px, {TEST_EXAMPLES} test images; {checkpoint}")
    print(f"{'':18s} {'upstream':>9s} {'random':>9s} {'margin':>8s}")
    for key, value in results["upstream"].items():
        scratch = results["random_init"][key]
        print(f"{key:18s} {value:9.3f} {scratch:9.3f} {value - scratch:+8.3f}")
    print(json.dumps({"checkpoint": str(checkpoint), "image_size": args.image_size, **results}))
    return results


if __name__ == "__main__":
    main()
