"""Training and evaluation inputs, built on the one BiT preprocessing definition.

Evaluation resizes to the crop size with `modeling_bit.bit_image_processor(crop)` — the processor that
is saved as `preprocessor_config.json`. Training resizes with `bit_image_processor(precrop)` and then
takes a random `crop` x `crop` square and a random horizontal flip of that tensor (docs/recipe.md,
"BiT-HyperRule": "Training: resize to a square, random square crop, random horizontal flip"); without
random cropping it resizes straight to the crop size, as evaluation does.

Images are decoded with `image_data.read_image` in DataLoader worker processes, under the one policy for
unreadable images (`image_data.unreadable`): an unreadable file never crashes a worker; the example comes
back as `{"unreadable": name}`, `ImageBatchCollator` drops it from the batch and lists it under
`unreadable_images`, and `BitTrainer` records each distinct name once.

Small training sets are decoded and resized once (`preprocess`) and kept in memory: a few-shot run
reads each image hundreds of times otherwise. `HyperRuleTrainingStream` then serves the whole run as
one sequence of `steps x batch` positions: each epoch a seeded permutation of the examples, each
position its own seeded crop and flip (`image_data.EpochOrder`). The data order and augmentation are a
function of the position, so a resumed run sees exactly what the uninterrupted run would have seen, with
any number of workers.
"""

from __future__ import annotations

import logging

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from image_data import EpochOrder, UnreadableImage, UnreadableImages, read_image
from modeling_bit import bit_image_processor

from .data import IMAGE_COLUMN, LABEL_COLUMN
from .errors import FinetuneInputError

logger = logging.getLogger(__name__)

# Training sets whose resized float32 images fit this many bytes are preprocessed once and kept in memory.
IN_MEMORY_BYTES = 2 * 1024**3
# Images per preprocessing batch (decoding parallelises across workers, one batch per worker at a time).
PREPROCESS_BATCH_SIZE = 64


def resize_to_square(image, resolution: int, processor=None) -> torch.Tensor:
    """(3, resolution, resolution) float tensor in [-1, 1]: the BiT processor applied to one image."""
    processor = processor or bit_image_processor(resolution)
    return processor(image, return_tensors="pt")["pixel_values"][0]


def random_crop_and_flip(pixel_values: torch.Tensor, crop: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    """A random `crop` x `crop` square of a (3, H, W) tensor, mirrored left-right with probability 1/2."""
    height, width = pixel_values.shape[-2:]
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    pixel_values = pixel_values[..., top : top + crop, left : left + crop]
    if flip and rng.random() < 0.5:
        pixel_values = pixel_values.flip(-1)
    return pixel_values.contiguous()


class DecodedImages(torch.utils.data.Dataset):
    """Example i of a map-style dataset, decoded and resized to `resolution` (in the calling worker)."""

    def __init__(self, dataset: datasets.Dataset, resolution: int):
        self.dataset = dataset
        self.resolution = resolution
        self.processor = bit_image_processor(resolution)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        example = self.dataset[int(index)]
        return decode_example(example, index, self.resolution, self.processor)


def decode_example(example: dict, index: int, resolution: int, processor) -> dict:
    """`{"pixel_values", "labels"}` of example `index`, or `{"unreadable": name}` (`image_data.image_name`)."""
    try:
        image = read_image(example[IMAGE_COLUMN], index)
    except UnreadableImage as error:
        logger.debug("Skipping unreadable image: %s", error)
        return {"unreadable": error.name}
    return {"pixel_values": resize_to_square(image, resolution, processor), "labels": example[LABEL_COLUMN]}


class PreprocessedImages(torch.utils.data.Dataset):
    """Images already resized to `resolution`, in memory, with their labels; the unreadable ones left out
    (`unreadable`: their distinct names)."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, unreadable: list[str]):
        self.pixel_values = pixel_values
        self.labels = labels
        self.unreadable = unreadable

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}

    def select(self, indices) -> PreprocessedImages:
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return PreprocessedImages(self.pixel_values[indices], self.labels[indices], self.unreadable)


def fits_in_memory(num_examples: int, resolution: int, budget: int = IN_MEMORY_BYTES) -> bool:
    return num_examples * 3 * resolution * resolution * 4 <= budget


def preprocess(
    dataset: datasets.Dataset, resolution: int, *, num_workers: int = 0, description: str = "Preprocessing"
) -> PreprocessedImages:
    """Decode and resize every image once (in `num_workers` worker processes); unreadable ones skipped."""
    loader = torch.utils.data.DataLoader(
        DecodedImages(dataset, resolution),
        batch_size=PREPROCESS_BATCH_SIZE,
        num_workers=num_workers,
        collate_fn=ImageBatchCollator(resolution),
    )
    # Filled in place (no second copy while concatenating); unreadable images leave the tail unused.
    pixel_values = torch.empty(len(dataset), 3, resolution, resolution)
    labels = torch.empty(len(dataset), dtype=torch.long)
    readable, unreadable = 0, UnreadableImages()
    with tqdm(total=len(dataset), desc=description, unit="img", leave=False) as progress:
        for batch in loader:
            count = len(batch["labels"])
            pixel_values[readable : readable + count] = batch["pixel_values"]
            labels[readable : readable + count] = batch["labels"]
            readable += count
            unreadable.add(batch["unreadable_images"])
            progress.update(count + len(batch["unreadable_images"]))
    return PreprocessedImages(pixel_values[:readable], labels[:readable], unreadable.names())


class ImageBatchCollator:
    """Stack readable examples into `pixel_values`/`labels`; name the unreadable ones in `unreadable_images`."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, examples: list[dict]) -> dict:
        readable = [example for example in examples if "unreadable" not in example]
        if readable:
            pixel_values = torch.stack([example["pixel_values"] for example in readable])
        else:
            pixel_values = torch.empty(0, 3, self.resolution, self.resolution)
        labels = torch.as_tensor([int(example["labels"]) for example in readable], dtype=torch.long)
        return {
            "pixel_values": pixel_values,
            "labels": labels,
            "unreadable_images": [example["unreadable"] for example in examples if "unreadable" in example],
        }


class HyperRuleTrainingStream(torch.utils.data.Dataset):
    """Position p of a training run of `length` images, as BiT's input pipeline repeats and shuffles.

    Epoch e = p // n visits the n examples in the order of a permutation seeded by (seed, 0, e); the crop
    offset and flip of position p are drawn from a generator seeded by (seed, 1, p). `source` yields
    examples at the pre-crop resolution (in memory or decoded on access).
    """

    def __init__(
        self,
        source: PreprocessedImages | DecodedImages,
        length: int,
        *,
        crop: int,
        seed: int,
        flip: bool = True,
        random_crop: bool = True,
    ):
        if len(source) == 0:
            raise FinetuneInputError("None of the training images is readable.")
        self.source = source
        self.length = length
        self.crop = crop
        self.seed = seed
        self.flip = flip
        self.random_crop = random_crop
        # Salt 0 for the order, 1 for the crops: two generators of the same seed, never the same draws.
        self.order = EpochOrder(len(source), seed, salt=(0,))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> dict:
        if not 0 <= position < self.length:
            raise IndexError(position)
        example = self.source[self.order.index_of(position)]
        if "unreadable" in example:
            return example
        rng = np.random.default_rng((self.seed, 1, int(position)))
        pixel_values = example["pixel_values"]
        if self.random_crop:
            pixel_values = random_crop_and_flip(pixel_values, self.crop, rng, self.flip)
        elif self.flip and rng.random() < 0.5:
            pixel_values = pixel_values.flip(-1).contiguous()
        return {"pixel_values": pixel_values, "labels": example["labels"]}

    def __getitems__(self, positions: list[int]) -> list[dict]:
        """`[self[p] for p in positions]`, fetched at once (the DataLoader's batched fetch). From images in memory
        the crops are cut as array views into one batch (the same draws from the same generators as `self[p]`):
        a few-shot run otherwise spends a tenth of its time in per-example tensor calls."""
        if not isinstance(self.source, PreprocessedImages):
            return [self[position] for position in positions]
        for position in positions:
            if not 0 <= position < self.length:
                raise IndexError(position)
        indices = [self.order.index_of(position) for position in positions]
        images = self.source.pixel_values.numpy()
        height, width = images.shape[-2:]
        size = (self.crop, self.crop) if self.random_crop else (height, width)
        batch = np.empty((len(positions), images.shape[1], *size), dtype=images.dtype)
        for row, (position, index) in enumerate(zip(positions, indices)):
            rng = np.random.default_rng((self.seed, 1, int(position)))
            top = int(rng.integers(0, height - size[0] + 1)) if self.random_crop else 0
            left = int(rng.integers(0, width - size[1] + 1)) if self.random_crop else 0
            view = images[index, :, top : top + size[0], left : left + size[1]]
            batch[row] = view[..., ::-1] if self.flip and rng.random() < 0.5 else view
        pixel_values = torch.from_numpy(batch)
        labels = self.source.labels[torch.as_tensor(indices, dtype=torch.long)]
        return [{"pixel_values": pixel_values[row], "labels": labels[row]} for row in range(len(positions))]


class StreamedImages(torch.utils.data.IterableDataset):
    """A streamed `datasets.IterableDataset`, decoded (and for training randomly cropped and flipped).

    Iterating the underlying stream inside a DataLoader worker gives each worker its own shards.
    The augmentation uses the worker's torch-seeded generator, so a resumed stream is not bit-identical.
    """

    def __init__(
        self, dataset: datasets.IterableDataset, resolution: int, *, crop: int | None = None, flip: bool = False
    ):
        self.dataset = dataset
        self.resolution = resolution
        self.crop = crop
        self.flip = flip

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        processor = bit_image_processor(self.resolution)
        rng = np.random.default_rng(torch.initial_seed())
        for index, example in enumerate(self.dataset):
            item = decode_example(example, index, self.resolution, processor)
            if "unreadable" not in item and self.crop is not None:
                item["pixel_values"] = random_crop_and_flip(item["pixel_values"], self.crop, rng, self.flip)
            yield item
