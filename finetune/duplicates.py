"""Near-duplicates of upstream images in a test set: the `duplicates.json` format and the paper's Table 6.

BiT removes near-duplicates of the upstream training images from every downstream test set and reports accuracy
on the full and on the de-duplicated test set with the number removed (paper §4.5, Table 6; docs/recipe.md
"Near-duplicates"). `bit-dedup` (the `dedup` package) finds them and writes `duplicates.json`; this module reads
it, for `bit-finetune --exclude-duplicates` and for `bit-dedup` itself, so the format is declared once:

    {"threshold": T, "model": M, "pairs": [{"downstream": NAME, "upstream": NAME, "similarity": S,
     "downstream_sha256": HEX}, ...], ...}

with the pairs at or above the threshold. Items are named by path (relative to the folder searched) or, for
`datasets` sources, as `split[index]`; `downstream_sha256` is the SHA-256 of the downstream item's encoded file,
which is how a test split is matched against the record (a copied or renamed folder still matches; the pairs
of another test set match nothing, which is refused rather than reported as "no duplicates").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_bit.file_utils import atomic_write_json

from .data import IMAGE_COLUMN, image_source
from .errors import FinetuneInputError
from .preprocessing import PreprocessedImages, preprocess

logger = logging.getLogger(__name__)

DUPLICATES_FILE = "duplicates.json"
PAIR_KEYS = ("downstream", "upstream", "similarity", "downstream_sha256")
# Images per evaluation forward pass.
EVAL_BATCH_SIZE = 64


@dataclasses.dataclass(frozen=True)
class DuplicatePair:
    downstream: str
    upstream: str
    similarity: float
    downstream_sha256: str


@dataclasses.dataclass
class DuplicatesRecord:
    """What `duplicates.json` holds: the threshold, the feature model, the pairs, and what else bit-dedup recorded
    (sources, counts, calibration) under `details`."""

    threshold: float
    model: str
    pairs: list[DuplicatePair]
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def downstream_digests(self) -> frozenset[str]:
        return frozenset(pair.downstream_sha256 for pair in self.pairs)

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "model": self.model,
            "pairs": [dataclasses.asdict(pair) for pair in self.pairs],
            **self.details,
        }


def write_duplicates(path: str | os.PathLike, record: DuplicatesRecord) -> Path:
    return atomic_write_json(path, record.to_dict())


def read_duplicates(path: str | os.PathLike) -> DuplicatesRecord:
    """The record in `path`, or a `FinetuneInputError` naming what is wrong with it."""
    path = Path(path)
    expected = "expected the duplicates.json that bit-dedup writes ({'threshold': ..., 'model': ..., 'pairs': [...]})"
    try:
        value = json.loads(path.read_text())
    except OSError as error:
        raise FinetuneInputError(f"{path}: cannot read it ({error}); {expected}.") from error
    except ValueError as error:
        raise FinetuneInputError(f"{path}: not JSON ({error}); {expected}.") from error
    if not isinstance(value, dict) or not {"threshold", "model", "pairs"} <= set(value):
        raise FinetuneInputError(f"{path}: {expected}.")
    if not isinstance(value["pairs"], list):
        raise FinetuneInputError(f"{path}: 'pairs' is {type(value['pairs']).__name__}, expected a list.")
    pairs = []
    for index, pair in enumerate(value["pairs"]):
        if not isinstance(pair, dict) or not set(PAIR_KEYS) <= set(pair):
            raise FinetuneInputError(f"{path}: pair {index} is {pair!r}; expected the keys {list(PAIR_KEYS)}.")
        pairs.append(DuplicatePair(*(pair[key] for key in PAIR_KEYS)))
    details = {key: item for key, item in value.items() if key not in ("threshold", "model", "pairs")}
    return DuplicatesRecord(float(value["threshold"]), str(value["model"]), pairs, details)


def sha256_of(source: str | os.PathLike | bytes) -> str:
    """SHA-256 of an encoded image (bytes, or the file at a path)."""
    digest = hashlib.sha256()
    if isinstance(source, bytes):
        digest.update(source)
    else:
        with open(source, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def duplicate_indices(dataset: datasets.Dataset, record: DuplicatesRecord) -> np.ndarray:
    """Indices of the examples of `dataset` that `record` names as near-duplicates (by file content).

    A record with pairs none of which is in `dataset` was made for another test set: refused."""
    wanted = record.downstream_digests
    if not wanted:
        return np.zeros(0, dtype=np.int64)
    entries = dataset.select_columns([IMAGE_COLUMN])
    found = []
    for index, example in enumerate(tqdm(entries, desc="Matching duplicates", unit="img", leave=False)):
        try:
            digest = sha256_of(image_source(example[IMAGE_COLUMN]))
        except OSError:
            continue  # an unreadable file is skipped (and counted) by the evaluation
        if digest in wanted:
            found.append(index)
    if not found:
        raise FinetuneInputError(
            f"None of the {len(wanted)} near-duplicate(s) in the record (found by bit-dedup among "
            f"{record.details.get('downstream', {}).get('name', 'its downstream set')!r}) is in the evaluation split: "
            "was duplicates.json made for this test set?"
        )
    return np.asarray(found, dtype=np.int64)


def _correct_predictions(model: torch.nn.Module, images: PreprocessedImages, description: str) -> int:
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(images, batch_size=EVAL_BATCH_SIZE)
    correct = 0
    with torch.inference_mode(), tqdm(total=len(images), desc=description, unit="img", leave=False) as progress:
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"].to(device)).logits
            correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
            progress.update(len(batch["labels"]))
    return correct


@dataclasses.dataclass
class DeduplicatedAccuracy:
    """One row of Table 6: accuracy on the full and on the de-duplicated test set, and the number removed."""

    full_accuracy: float
    deduplicated_accuracy: float
    duplicates_removed: int
    num_examples: int
    unreadable_images: list[str]

    def results(self, prefix: str = "eval_") -> dict:
        """As HF-examples-style results (`eval_accuracy_deduplicated`, ...)."""
        return {
            f"{prefix}accuracy_full": self.full_accuracy,
            f"{prefix}accuracy_deduplicated": self.deduplicated_accuracy,
            f"{prefix}duplicates_removed": self.duplicates_removed,
            f"{prefix}samples_deduplicated": self.num_examples - self.duplicates_removed,
        }


def evaluate_deduplicated(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    record: DuplicatesRecord,
    resolution: int,
    *,
    num_workers: int = 0,
) -> DeduplicatedAccuracy:
    """Top-1 accuracy of `model` (a classifier whose labels are the dataset's class indices) on `dataset` and on
    `dataset` without the near-duplicates `record` names, images resized to `resolution` (the evaluation
    preprocessing of `finetune.preprocessing`). Unreadable images are skipped in both and counted."""
    removed = duplicate_indices(dataset, record)
    full = preprocess(dataset, resolution, num_workers=num_workers, description="Decoding the test images")
    if len(full) == 0:
        raise FinetuneInputError("None of the test images is readable.")
    duplicates = preprocess(dataset.select(removed), resolution, num_workers=num_workers, description="Duplicates")
    model = model.eval()
    correct_full = _correct_predictions(model, full, "Evaluating (full)")
    correct_duplicates = _correct_predictions(model, duplicates, "Evaluating (duplicates)") if len(duplicates) else 0
    kept = len(full) - len(duplicates)
    if kept == 0:
        raise FinetuneInputError("Every readable test image is a near-duplicate: the de-duplicated test set is empty.")
    return DeduplicatedAccuracy(
        full_accuracy=correct_full / len(full),
        deduplicated_accuracy=(correct_full - correct_duplicates) / kept,
        duplicates_removed=len(duplicates),
        num_examples=len(full),
        unreadable_images=list(full.unreadable),
    )


def table6(rows: Sequence[tuple[str, DeduplicatedAccuracy]]) -> str:
    """Table 6's format (paper §4.5): test set, Full, Dedup, Dups; accuracies in percent."""
    lines = ["| test set | Full | Dedup | Dups |", "|---|---|---|---|"]
    for name, row in rows:
        lines.append(
            f"| {name} | {100 * row.full_accuracy:.1f} | {100 * row.deduplicated_accuracy:.1f} | "
            f"{row.duplicates_removed} |"
        )
    return "\n".join(lines)


class DeduplicatedEvaluation:
    """`FinetuneJob.extra_results` for `bit-finetune --exclude-duplicates FILE`: the fine-tuned model's accuracy on
    the evaluation split with and without the near-duplicates `FILE` names, logged as Table 6.

    The record is read and matched against the evaluation split at construction, before anything is trained."""

    def __init__(self, path: str | os.PathLike, evaluation: datasets.Dataset, test_set_name: str):
        if isinstance(evaluation, datasets.IterableDataset):
            raise FinetuneInputError(
                "--exclude-duplicates matches the evaluation images by content: drop --streaming."
            )
        self.record = read_duplicates(path)
        self.removed = duplicate_indices(evaluation, self.record)
        self.test_set_name = test_set_name

    def __call__(self, job, result) -> dict:
        from modeling_bit import BitForImageClassification

        model = BitForImageClassification.from_pretrained(str(result.saved_model_dir()))
        if torch.cuda.is_available():
            model = model.cuda()
        row = evaluate_deduplicated(model, job.data.eval, self.record, result.rule.crop, num_workers=job.num_workers)
        logger.info("Accuracy on the full and the de-duplicated test set (BiT paper Table 6):")
        logger.info(table6([(self.test_set_name, row)]))
        return {**row.results(), "duplicates_threshold": self.record.threshold, "duplicates_model": self.record.model}
