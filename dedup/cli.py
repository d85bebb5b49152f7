"""`bit-dedup` (also `python -m dedup`): near-duplicates of an upstream training set in a downstream set.

    bit-dedup --upstream-dir U --downstream-dir D --output-dir O [--model M] [--threshold T]
    bit-dedup --upstream-dataset NAME --upstream-streaming --downstream-dataset NAME2 --downstream-split test ...
    bit-dedup ... --finetuned-model F       # Table 6: F's accuracy on the full and the de-duplicated D

Arguments are dataclasses parsed by `HfArgumentParser`; the run itself is `dedup.job.run_dedup`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers import HfArgumentParser

from finetune.command_line import HelpFormatter, configure_logging
from finetune.errors import FinetuneInputError

from .calibration import CALIBRATION_IMAGES, FALSE_POSITIVE_IMAGE_RATE
from .errors import DedupInputError
from .features import DEFAULT_BATCH_SIZE, DEFAULT_CROP_VIEWS, DEFAULT_MODEL, load_feature_model
from .job import DEFAULT_NEIGHBOURS, DedupJob, default_num_workers, run_dedup
from .search import DEFAULT_MEMORY_BYTES
from .sources import DatasetSource, FolderSource, ImageSource


@dataclasses.dataclass
class UpstreamArguments:
    _argument_group_name = "Upstream (the pre-training images; one of --upstream-dir, --upstream-dataset)"

    upstream_dir: str | None = dataclasses.field(default=None, metadata={"help": "Folder of images (any layout)."})
    upstream_dataset: str | None = dataclasses.field(
        default=None, metadata={"help": "A datasets.load_dataset name (Hub) or local dataset folder."}
    )
    upstream_config: str | None = dataclasses.field(default=None, metadata={"help": "Configuration of it."})
    upstream_split: str = dataclasses.field(default="train", metadata={"help": "Its split."})
    upstream_image_column: str = dataclasses.field(default="image", metadata={"help": "Its image column."})
    upstream_streaming: bool = dataclasses.field(
        default=False, metadata={"help": "Stream it instead of downloading it (read once, in order)."}
    )


@dataclasses.dataclass
class DownstreamArguments:
    _argument_group_name = "Downstream (the test set; one of --downstream-dir, --downstream-dataset)"

    downstream_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Folder of images (any layout; one subfolder per class for Table 6)."}
    )
    downstream_dataset: str | None = dataclasses.field(
        default=None, metadata={"help": "A datasets.load_dataset name (Hub) or local dataset folder."}
    )
    downstream_config: str | None = dataclasses.field(default=None, metadata={"help": "Configuration of it."})
    downstream_split: str = dataclasses.field(default="test", metadata={"help": "Its split."})
    downstream_image_column: str = dataclasses.field(default="image", metadata={"help": "Its image column."})
    downstream_label_column: str = dataclasses.field(
        default="label", metadata={"help": "Its label column (Table 6 only)."}
    )


@dataclasses.dataclass
class SearchArguments:
    _argument_group_name = "Search"

    output_dir: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Folder for duplicates.json, neighbours.json, duplicates.png (and Table 6) (required)."},
    )
    model: str = dataclasses.field(
        default=DEFAULT_MODEL,
        metadata={"help": "BiT checkpoint for the features: a folder, Hub id or published BiT name."},
    )
    resolution: int | None = dataclasses.field(
        default=None, metadata={"help": "Square input size of the features (default: the model folder's, else 224)."}
    )
    threshold: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Cosine similarity (the highest over the two images' views) at or above which a pair is a "
            "near-duplicate (default: calibrated on "
            f"{CALIBRATION_IMAGES} downstream images with planted near-duplicates, at most "
            f"{FALSE_POSITIVE_IMAGE_RATE:.0%} of distinct images flagged)."
        },
    )
    neighbours: int = dataclasses.field(
        default=DEFAULT_NEIGHBOURS,
        metadata={"help": "Nearest upstream images per downstream image in neighbours.json."},
    )
    no_flip_invariant: bool = dataclasses.field(
        default=False,
        metadata={"help": "Features of the image alone (default: of the image and its mirror image: flips match)."},
    )
    crop_views: list[float] = dataclasses.field(
        default_factory=lambda: list(DEFAULT_CROP_VIEWS),
        metadata={
            "help": "Central crops (side fractions) that are features too, besides the whole image, for every "
            "image on both sides: a copy cropped to about such a window matches. Each costs one more feature pass."
        },
    )
    no_crop_views: bool = dataclasses.field(
        default=False, metadata={"help": "Features of the whole image only (cheapest; crops are then missed)."}
    )
    faiss: bool = dataclasses.field(
        default=False, metadata={"help": "Search with faiss's exact inner-product index (pip install faiss-cpu)."}
    )
    batch_size: int = dataclasses.field(default=DEFAULT_BATCH_SIZE, metadata={"help": "Images per forward pass."})
    num_workers: int = dataclasses.field(
        default_factory=default_num_workers, metadata={"help": "Processes decoding images (default: CPU cores, <= 8)."}
    )
    memory_mb: int = dataclasses.field(
        default=DEFAULT_MEMORY_BYTES // 1024**2, metadata={"help": "Similarity block size in MiB (bounds memory)."}
    )
    device: str | None = dataclasses.field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda if any)."})
    cache_dir: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Feature cache (default: <HF_HOME>/assets/bit-transfer/dedup/features)."},
    )
    no_picture: bool = dataclasses.field(default=False, metadata={"help": "Do not draw duplicates.png."})
    overwrite_output_dir: bool = dataclasses.field(
        default=False, metadata={"help": "Replace a non-empty --output-dir."}
    )
    finetuned_model: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "A bit-finetune output folder: Table 6, its accuracy on the full and the de-duplicated "
            "downstream set (which needs labels)."
        },
    )


ARGUMENT_CLASSES = (UpstreamArguments, DownstreamArguments, SearchArguments)
USAGE = """
  bit-dedup --upstream-dir U --downstream-dir D --output-dir O [--model M] [--threshold T] [options]
  bit-dedup --upstream-dataset NAME [--upstream-streaming] --downstream-dataset NAME2 [--downstream-split test]
            --output-dir O [options]
  bit-dedup ... --finetuned-model F     + Table 6: F's accuracy on the full and the de-duplicated downstream set"""


def _source(arguments, side: str) -> ImageSource:
    folder = getattr(arguments, f"{side}_dir")
    dataset = getattr(arguments, f"{side}_dataset")
    if (folder is None) == (dataset is None):
        raise DedupInputError(f"Give one of --{side}-dir (an image folder) or --{side}-dataset (a datasets name).")
    if folder is not None:
        if side == "upstream" and arguments.upstream_streaming:
            raise DedupInputError(
                "--upstream-streaming goes with --upstream-dataset (a folder is read in order anyway)."
            )
        return FolderSource(folder, f"--{side}-dir")
    return DatasetSource(
        dataset,
        flag=f"--{side}-dataset",
        config=getattr(arguments, f"{side}_config"),
        split=getattr(arguments, f"{side}_split"),
        image_column=getattr(arguments, f"{side}_image_column"),
        streaming=side == "upstream" and arguments.upstream_streaming,
    )


def make_job(argv: Sequence[str]) -> DedupJob:
    parser = HfArgumentParser(
        ARGUMENT_CLASSES,
        prog="bit-dedup",
        usage=USAGE,
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    upstream, downstream, search = parser.parse_args_into_dataclasses(args=list(argv), look_for_args_file=False)
    if search.output_dir is None:
        raise DedupInputError("--output-dir is required.")
    for name, least in (("neighbours", 1), ("batch_size", 1), ("num_workers", 0), ("memory_mb", 1)):
        if getattr(search, name) < least:
            raise DedupInputError(f"--{name.replace('_', '-')} {getattr(search, name)}: expected at least {least}.")
    if search.resolution is not None and search.resolution < 32:
        raise DedupInputError(
            f"--resolution {search.resolution}: expected at least 32 pixels (BiT downsamples by 32)."
        )
    if search.threshold is not None and not -1 <= search.threshold <= 1:
        raise DedupInputError(f"--threshold {search.threshold}: expected a cosine similarity in [-1, 1].")
    if search.no_crop_views and search.crop_views != list(DEFAULT_CROP_VIEWS):
        raise DedupInputError("--no-crop-views and --crop-views contradict each other; give one.")
    if search.faiss:
        try:
            import faiss  # noqa: F401
        except ImportError as error:
            raise DedupInputError("--faiss needs the faiss package: pip install faiss-cpu (or faiss-gpu).") from error
    up, down = _source(upstream, "upstream"), _source(downstream, "downstream")
    model = load_feature_model(
        search.model,
        resolution=search.resolution,
        flip_invariant=not search.no_flip_invariant,
        crop_views=() if search.no_crop_views else search.crop_views,
        device=search.device,
    )
    return DedupJob(
        model=model,
        upstream=up,
        downstream=down,
        output_dir=Path(search.output_dir),
        threshold=search.threshold,
        neighbours=search.neighbours,
        cache_dir=Path(search.cache_dir) if search.cache_dir else None,
        batch_size=search.batch_size,
        num_workers=search.num_workers,
        use_faiss=search.faiss,
        memory_bytes=search.memory_mb * 1024**2,
        overwrite_output_dir=search.overwrite_output_dir,
        picture=not search.no_picture,
        finetuned_model=search.finetuned_model,
        downstream_labels={"label_column": downstream.downstream_label_column},
        command=["bit-dedup", *argv],
    )


def _configure_logging() -> None:
    """Our messages as plain lines on stdout: the fine-tuning layer's handler, for the "dedup" loggers too."""
    configure_logging()
    dedup_logger = logging.getLogger("dedup")
    if not dedup_logger.handlers:
        for handler in logging.getLogger("finetune").handlers:
            dedup_logger.addHandler(handler)
    dedup_logger.setLevel(logging.INFO)
    dedup_logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `bit-dedup`; returns the exit status (2: bad input, 130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    try:
        run_dedup(make_job(argv))
    except FinetuneInputError as error:
        print(f"bit-dedup: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bit-dedup: interrupted. Computed features are cached: the same command continues.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
