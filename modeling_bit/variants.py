"""The BiT variants, in one table: every published checkpoint, and the small networks for CPU work.

Presets (`BitConfig.from_preset`), the published catalog (`modeling_bit.published`: names, files, heads,
resolutions) and the names model cards give a network (`architecture_name`, `small_network_name`) are all derived
from `PUBLISHED_CHECKPOINTS` and `SMALL_NETWORKS` below. The architecture facts are those of docs/recipe.md
("Architecture", "Published checkpoints"); file names are those of the big_transfer README
(github.com/google-research/big_transfer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Stage depths per ResNet-v2 depth, stem and stage output channels at width 1 (docs/recipe.md "Architecture":
# stage s outputs 4 * 64 * 2^(s-1) channels).
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
RESNET_STEM_CHANNELS = 64
RESNET_HIDDEN_SIZES = (256, 512, 1024, 2048)

# The published (depth, width) pairs; each exists as BiT-S (ILSVRC-2012) and BiT-M (ImageNet-21k), paper §3.3.
PUBLISHED_ARCHITECTURES = ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))

# Upstream and fine-tuning data of the published heads, and their classes (paper §3.1).
IMAGENET21K = "imagenet-21k"  # BiT-M upstream head
ILSVRC2012 = "ilsvrc-2012"  # BiT-S upstream head and every ILSVRC-2012 fine-tuned head
NUM_CLASSES = {IMAGENET21K: 21843, ILSVRC2012: 1000}

# The square size each head was trained (or fine-tuned) to see, written to a converted folder's
# preprocessor_config.json so that the folder works as it is, e.g. in a pipeline.
# - Upstream BiT-S/M: 224, the standard ImageNet training resolution (the paper does not state the upstream one;
#   timm's configs for these very files, `resnetv2_*_bit.goog_in21k`, use 224). The BiT-HyperRule's 448/384
#   (paper) or 512/480 (released code) are fine-tuning settings picked from a task's images, not properties of an
#   upstream checkpoint.
UPSTREAM_RESOLUTION = 224
# - BiT-M-*-ILSVRC2012: the released code's BiT-HyperRule trains and tests ILSVRC-2012 (images larger than 96x96)
#   at crop 480 (docs/recipe.md "BiT-HyperRule": get_resolution -> (512, 480)); timm evaluates five of these files
#   at 448 and R152x4 at 480.
ILSVRC2012_FINETUNED_RESOLUTION = 480

BIT_WEIGHTS_URL_ENV = "BIT_WEIGHTS_URL"
DEFAULT_BIT_WEIGHTS_URL = "https://storage.googleapis.com/bit_models"


@dataclass(frozen=True)
class Architecture:
    """A ResNet-v2 of the paper: depth 50, 101 or 152 at an integer width factor."""

    depth: int
    width: int

    @property
    def name(self) -> str:
        return f"R{self.depth}x{self.width}"

    @property
    def depths(self) -> tuple[int, ...]:
        return RESNET_DEPTHS[self.depth]

    def config_fields(self) -> dict:
        """The `BitConfig` fields of this network."""
        return {
            "depths": self.depths,
            "embedding_size": RESNET_STEM_CHANNELS,
            "hidden_sizes": RESNET_HIDDEN_SIZES,
            "width_factor": self.width,
        }


@dataclass(frozen=True)
class PublishedCheckpoint:
    """A checkpoint the BiT authors released as a `.npz` in the published layout."""

    name: str  # canonical spelling
    architecture: Architecture
    upstream_dataset: str  # IMAGENET21K | ILSVRC2012
    fine_tuned_on: str | None  # ILSVRC2012 for the fine-tuned heads
    resolution: int
    file: str  # path under the base URL

    @property
    def head_dataset(self) -> str:
        return self.fine_tuned_on or self.upstream_dataset

    @property
    def num_labels(self) -> int:
        return NUM_CLASSES[self.head_dataset]

    @property
    def depths(self) -> tuple[int, ...]:
        return self.architecture.depths

    @property
    def width_factor(self) -> int:
        return self.architecture.width

    @property
    def url(self) -> str:
        """`<base>/<file>`: the base is `$BIT_WEIGHTS_URL` (a mirror of the bucket), by default the BiT bucket."""
        base = os.environ.get(BIT_WEIGHTS_URL_ENV) or DEFAULT_BIT_WEIGHTS_URL
        return f"{base.rstrip('/')}/{self.file}"


def _published_checkpoints() -> tuple[PublishedCheckpoint, ...]:
    rows = []
    for depth, width in PUBLISHED_ARCHITECTURES:
        architecture = Architecture(depth, width)
        for name, upstream, fine_tuned, resolution in (
            (f"BiT-S-{architecture.name}", ILSVRC2012, None, UPSTREAM_RESOLUTION),
            (f"BiT-M-{architecture.name}", IMAGENET21K, None, UPSTREAM_RESOLUTION),
            (f"BiT-M-{architecture.name}-ILSVRC2012", IMAGENET21K, ILSVRC2012, ILSVRC2012_FINETUNED_RESOLUTION),
        ):
            rows.append(PublishedCheckpoint(name, architecture, upstream, fine_tuned, resolution, f"{name}.npz"))
    # The R50x1 students distilled from BiT-M-R152x2 ("Knowledge distillation: A good teacher is patient and
    # consistent", Beyer et al. 2021) learned ILSVRC-2012 from their teachers, BiT-M fine-tuned on it. Each was
    # trained and evaluated at the resolution in its file name; the name we give them says what they are.
    for resolution in (224, 160):
        file = f"distill/R50x1_{resolution}.npz"
        rows.append(
            PublishedCheckpoint(
                f"BiT-R50x1-distilled-{resolution}", Architecture(50, 1), ILSVRC2012, None, resolution, file
            )
        )
    for resolution in (224, 384):
        file = f"distill/R152x2_T_{resolution}.npz"
        name = f"BiT-M-R152x2-teacher-{resolution}"
        rows.append(PublishedCheckpoint(name, Architecture(152, 2), IMAGENET21K, ILSVRC2012, resolution, file))
    return tuple(rows)


PUBLISHED_CHECKPOINTS: dict[str, PublishedCheckpoint] = {row.name: row for row in _published_checkpoints()}

# Small networks for CPU work, tests and demos: BiT's topology with fewer and narrower units; their group counts
# divide every channel count.
SMALL_NETWORKS = {
    # ~0.13M parameters: runs a 96x96 batch in milliseconds.
    "bit-tiny": {
        "depths": (1, 1, 1, 1),
        "embedding_size": 16,
        "hidden_sizes": (32, 64, 128, 256),
        "num_groups": 8,
        "width_factor": 1,
        "num_labels": 10,
    },
    # ~3.5M parameters: a ResNet-26-v2 at half width.
    "bit-small": {
        "depths": (2, 2, 2, 2),
        "embedding_size": 32,
        "hidden_sizes": (128, 256, 512, 1024),
        "num_groups": 16,
        "width_factor": 1,
        "num_labels": 10,
    },
}


def upstream_checkpoint(checkpoint: PublishedCheckpoint) -> PublishedCheckpoint | None:
    """The BiT-M checkpoint a fine-tuned one (-ILSVRC2012, the distillation teachers) started from, if published."""
    if not checkpoint.fine_tuned_on or checkpoint.upstream_dataset != IMAGENET21K:
        return None
    return PUBLISHED_CHECKPOINTS.get(f"BiT-M-{checkpoint.architecture.name}")


def architecture_name(depths, stem_channels: int, stage_channels) -> str | None:
    """`"R50x1"`-style name of a ResNet-v2 50, 101 or 152 at an integer width with these stage depths and channel
    counts (published or not), else None."""
    width, remainder = divmod(stem_channels, RESNET_STEM_CHANNELS)
    for depth, stage_depths in RESNET_DEPTHS.items():
        if (
            tuple(depths) == stage_depths
            and width >= 1
            and not remainder
            and tuple(stage_channels) == tuple(width * size for size in RESNET_HIDDEN_SIZES)
        ):
            return Architecture(depth, width).name
    return None


def small_network_name(depths, stem_channels: int, stage_channels) -> str | None:
    """The small network (`bit-tiny`, `bit-small`) with these stage depths and channel counts, if any."""
    for name, fields in SMALL_NETWORKS.items():
        width = fields["width_factor"]
        if (
            tuple(depths) == tuple(fields["depths"])
            and stem_channels == fields["embedding_size"] * width
            and tuple(stage_channels) == tuple(size * width for size in fields["hidden_sizes"])
        ):
            return name
    return None


__all__ = [
    "ILSVRC2012",
    "IMAGENET21K",
    "PUBLISHED_ARCHITECTURES",
    "PUBLISHED_CHECKPOINTS",
    "SMALL_NETWORKS",
    "Architecture",
    "PublishedCheckpoint",
    "architecture_name",
    "small_network_name",
    "upstream_checkpoint",
]
