"""One data layer for fine-tuning and pre-training (and any tool that reads image datasets).

- Loading (`image_data.sources`): `load_image_folder`, `load_image_dataset` (Hub id, local folder, builder with
  data files; `streaming=True`) give an `ImageSource`: its splits, `split(name)`, `validation_split_name()`
  (one candidate list, `VALIDATION_SPLIT_NAMES`); `find_image_column` / `find_label_column` detect columns
  (typed, then named candidates) and check that the image column can hold images; `undecoded` defers decoding.
- One image cell (`image_data.cells`): `read_image(cell)` for a path, encoded bytes, a PIL image or a
  {bytes, path} dict, raising `UnreadableImage` with the image's `name`; `image_name`, `image_area`.
- Unreadable images (`image_data.unreadable`): one policy, one count (distinct images, named):
  `UnreadableImages`.
- Order (`image_data.order`): `EpochOrder` (seeded per-epoch permutations), `shard_stream` (a stream's shards
  per process).
- `InputError`: the one error type for unusable input.

Imports `modeling_bit` (image decoding) and `datasets`; nothing from the trainers.
"""

from .cells import UnreadableImage, image_area, image_fingerprint, image_name, image_source, read_image
from .errors import InputError
from .order import EpochOrder, max_stream_workers, shard_stream
from .sources import (
    IMAGE_COLUMN_CANDIDATES,
    IMAGE_EXTENSIONS,
    LABEL_COLUMN_CANDIDATES,
    VALIDATION_SPLIT_NAMES,
    ImageSource,
    check_image_folder,
    declared_features,
    element_feature,
    find_image_column,
    find_label_column,
    load_image_dataset,
    load_image_folder,
    undecoded,
)
from .unreadable import UnreadableImages

__all__ = [
    "IMAGE_COLUMN_CANDIDATES",
    "IMAGE_EXTENSIONS",
    "LABEL_COLUMN_CANDIDATES",
    "VALIDATION_SPLIT_NAMES",
    "EpochOrder",
    "ImageSource",
    "InputError",
    "UnreadableImage",
    "UnreadableImages",
    "check_image_folder",
    "declared_features",
    "element_feature",
    "find_image_column",
    "find_label_column",
    "image_area",
    "image_fingerprint",
    "image_name",
    "image_source",
    "load_image_dataset",
    "load_image_folder",
    "max_stream_workers",
    "read_image",
    "shard_stream",
    "undecoded",
]
