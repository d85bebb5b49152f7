"""Does an upstream checkpoint's representation transfer? A linear probe on digits, pre-trained vs random init.

    python pretraining/transfer_check.py [--checkpoint FOLDER] [--image-size 64]
    python -m pretraining.transfer_check ...

scikit-learn's digits (1,797 handwritten 8x8 digits; needs the `dev` extra) upscaled to --image-size,
600 held out for testing: ridge regression on the frozen pre-logits of the checkpoint and of the same
architecture from random initialisation, with 1, 5 and 10 examples per class (median of 5 draws) and with
the whole training set.

A quick check of an upstream run's features, the same closed-form probe pre-training runs on its held-out
images. Fine-tuning is the fine-tuning package's: its main job (`bit-finetune` with no data arguments) is
the BiT-HyperRule comparison, transfer vs. from scratch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import HfArgumentParser
from transformers.utils import logging as transformers_logging

from modeling_bit import BitConfig, BitForImageClassification, bit_image_processor
from pretraining import embedded_checkpoint_path
from pretraining.probe import fit_ridge_classifier
from pretraining.recipe import FEW_SHOT_EXAMPLES_PER_CLASS, FEW_SHOT_TRIALS

TEST_EXAMPLES = 600


@dataclasses.dataclass
class TransferCheckArguments:
    checkpoint: str | None = dataclasses.field(default=None, metadata={"help": "Default: the embedded checkpoint."})
    image_size: int = dataclasses.field(default=64, metadata={"help": "Resolution the digits are upscaled to."})
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
            # The head's replacement is the point (a new 10-digit head), not news: transformers' load report of it
            # and its loading bar are kept quiet.
            verbosity = transformers_logging.get_verbosity()
            transformers_logging.set_verbosity_error()
            transformers_logging.disable_progress_bar()
            try:
                return BitForImageClassification.from_pretrained(
                    self.checkpoint, ignore_mismatched_sizes=True, **digit_names
                )
            finally:
                transformers_logging.set_verbosity(verbosity)
                transformers_logging.enable_progress_bar()
        return BitForImageClassification(BitConfig.from_pretrained(self.checkpoint, **digit_names))

    @torch.no_grad()
    def features(self, model, pixels: torch.Tensor) -> np.ndarray:
        model.eval()
        return torch.cat([model.bit(chunk).pooler_output.flatten(1) for chunk in pixels.split(256)]).numpy()

    def probe(self, model) -> dict:
        train_features = self.features(model, self.pixels(self.train, self.image_size))
        test_features = self.features(model, self.test_pixels)
        train_labels = self.labels[self.train]
        results = {}
        for k in FEW_SHOT_EXAMPLES_PER_CLASS:
            accuracies = []
            for trial in range(FEW_SHOT_TRIALS):
                rng = np.random.default_rng([self.seed, k, trial])
                chosen = balanced_subset(train_labels, np.arange(len(self.train)), k, rng)  # positions in train
                predict = fit_ridge_classifier(train_features[chosen], train_labels[chosen], 10)
                accuracies.append(float(np.mean(predict(test_features) == self.labels[self.test])))
            results[f"probe_{k}_shot"] = float(np.median(accuracies))
        predict = fit_ridge_classifier(train_features, train_labels, 10)
        results["probe_full"] = float(np.mean(predict(test_features) == self.labels[self.test]))
        return results

    def run(self) -> dict:
        results = {}
        for name, pretrained in (("upstream", True), ("random_init", False)):
            torch.manual_seed(self.seed)
            results[name] = self.probe(self.model(pretrained))
        return results


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(TransferCheckArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else embedded_checkpoint_path()
    results = DigitsTransfer(checkpoint, args.image_size, args.seed).run()
    print(f"digits at {args.image_size} px, {TEST_EXAMPLES} test images; {checkpoint}")
    print(f"{'':18s} {'upstream':>9s} {'random':>9s} {'margin':>8s}")
    for key, value in results["upstream"].items():
        scratch = results["random_init"][key]
        print(f"{key:18s} {value:9.3f} {scratch:9.3f} {value - scratch:+8.3f}")
    print(json.dumps({"checkpoint": str(checkpoint), "image_size": args.image_size, **results}))
    return results


if __name__ == "__main__":
    main()
