"""One bit-dedup run: near-duplicates of an upstream set in a downstream set, and Table 6 when asked.

`run_dedup(job)`:

1. checks everything before any feature is computed: the output folder, the feature model (a BiT checkpoint),
   both image sources, and, for Table 6, the fine-tuned model and the downstream labels;
2. computes (or reads from the cache) the downstream features, with the SHA-256 of every downstream file;
3. calibrates the threshold on a sample of the downstream images with planted near-duplicates, unless one is given
   (`dedup.calibration`);
4. streams the upstream features shard by shard through the exact search (`dedup.search`);
5. writes the output folder atomically: `duplicates.json` (`finetune.duplicates` format), `neighbours.json`,
   `duplicates.png` (Appendix D's picture) and, with a fine-tuned model, `deduplicated_results.json` and
   `table6.md` (paper §4.5, Table 6).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np

from finetune.data import load_hub_dataset, load_image_folders
from finetune.duplicates import (
    DUPLICATES_FILE,
    DeduplicatedAccuracy,
    DuplicatePair,
    DuplicatesRecord,
    evaluate_deduplicated,
    table6,
    write_duplicates,
)
from finetune.models import load_model_for_labels
from finetune.output_folder import check_output_dir
from modeling_bit.file_utils import atomic_directory, atomic_write_json, atomic_write_text
from modeling_bit.folder_layout import folder_resolution

from .calibration import calibrate, sample_images
from .errors import DedupInputError
from .features import FeatureCache, FeatureModel, FeatureShard, default_cache_dir, source_features
from .pictures import save_pairs_picture
from .search import DEFAULT_MEMORY_BYTES, make_search
from .sources import ImageSource

logger = logging.getLogger("dedup")

NEIGHBOURS_FILE = "neighbours.json"
PICTURE_FILE = "duplicates.png"
DEDUPLICATED_RESULTS_FILE = "deduplicated_results.json"
TABLE6_FILE = "table6.md"
DEFAULT_NEIGHBOURS = 5
# Upstream rows searched at a time (several cached shards are batched into one chunk).
SEARCH_CHUNK_ROWS = 65_536


@dataclasses.dataclass
class DedupJob:
    model: FeatureModel
    upstream: ImageSource
    downstream: ImageSource
    output_dir: Path
    threshold: float | None = None  # None: calibrated
    neighbours: int = DEFAULT_NEIGHBOURS
    cache_dir: Path | None = None
    batch_size: int = 64
    num_workers: int = 0
    use_faiss: bool = False
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    overwrite_output_dir: bool = False
    picture: bool = True
    finetuned_model: str | None = None  # Table 6: a bit-finetune folder, evaluated on the downstream set
    downstream_labels: dict = dataclasses.field(default_factory=dict)  # how to read the labels for Table 6
    command: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DedupResult:
    record: DuplicatesRecord
    table6_row: DeduplicatedAccuracy | None
    folder: Path


def _labelled_downstream(job: DedupJob):
    """The downstream set with labels, as the fine-tuning layer reads it (Table 6)."""
    options = job.downstream_labels
    record = job.downstream.record
    if "dir" in record:
        return load_image_folders(record["dir"], record["dir"]).eval
    return load_hub_dataset(
        record["dataset"],
        record["config"],
        image_column=record["image_column"],
        label_column=options.get("label_column", "label"),
        train_split=record["split"],
        validation_split=record["split"],
    ).eval


def _table6_inputs(job: DedupJob):
    """(classifier, test set with the classifier's label ids, resolution), all checked before any search."""
    folder = job.finetuned_model
    resolution = folder_resolution(folder)
    if resolution is None:
        raise DedupInputError(
            f"--finetuned-model {folder}: expected a folder bit-finetune wrote (with preprocessor_config.json)."
        )
    dataset = _labelled_downstream(job)
    names = dataset.features["label"].names
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise DedupInputError(f"--finetuned-model {folder}: not a model folder ({error}).") from error
    model_labels = [config.id2label[index] for index in sorted(config.id2label)]
    unknown = sorted(set(names) - set(model_labels))
    if unknown:
        raise DedupInputError(
            f"--finetuned-model {folder} was not trained on the downstream classes {unknown} (its classes: "
            f"{model_labels[:10]}{'...' if len(model_labels) > 10 else ''})."
        )
    if names != model_labels:
        dataset = dataset.align_labels_with_mapping({name: index for index, name in enumerate(model_labels)}, "label")
    model = load_model_for_labels(folder, model_labels, announce=False).to(job.model.device)
    return model, dataset, resolution


def _chunks(shards, rows: int = SEARCH_CHUNK_ROWS):
    """Upstream shards batched into chunks of about `rows` features, with each shard's names kept aside."""
    pending: list[FeatureShard] = []
    for shard in shards:
        pending.append(shard)
        if sum(len(item.names) for item in pending) >= rows:
            yield pending
            pending = []
    if pending:
        yield pending


def run_dedup(job: DedupJob) -> DedupResult:
    started = time.perf_counter()
    check_output_dir(job.output_dir, resume=False, overwrite=job.overwrite_output_dir, signature={})
    table6_inputs = _table6_inputs(job) if job.finetuned_model is not None else None
    cache_dir = job.cache_dir
    if cache_dir is None:
        cache_dir = default_cache_dir()
    model = job.model
    logger.info(
        "Features: %s at %d px (L2-normalised pre-logits%s; views: the whole image%s), on %s.",
        model.name,
        model.resolution,
        ", flip-invariant" if model.flip_invariant else "",
        "".join(f", central {fraction:.0%} of each side" for fraction in model.crop_views),
        model.device,
    )
    downstream_shards = list(
        source_features(
            model,
            job.downstream,
            cache_dir=cache_dir,
            batch_size=job.batch_size,
            num_workers=job.num_workers,
            with_digests=True,
            description="Downstream features",
        )
    )
    down_names = [name for shard in downstream_shards for name in shard.names]
    down_digests = [digest for shard in downstream_shards for digest in shard.digests]
    down_unreadable = [name for shard in downstream_shards for name in shard.unreadable]
    if not down_names:
        raise DedupInputError(f"{job.downstream.flag} {job.downstream.display_name}: none of its images is readable.")
    queries = np.concatenate([shard.features for shard in downstream_shards])
    del downstream_shards

    calibration = None
    threshold = job.threshold
    if threshold is None:
        calibration = calibrate(model, sample_images(job.downstream))
        threshold = calibration.threshold
        logger.info("Calibrated on planted near-duplicates: %s.", calibration.describe())
    elif not -1 <= threshold <= 1:
        raise DedupInputError(f"--threshold {threshold}: expected a cosine similarity in [-1, 1].")

    search = make_search(
        queries,
        k=job.neighbours,
        threshold=threshold,
        device=model.device,
        use_faiss=job.use_faiss,
        memory_bytes=job.memory_bytes,
    )
    # Where each upstream shard's rows start, to name them afterwards without keeping every name in memory.
    shard_starts: list[int] = []
    up_unreadable: list[str] = []
    shards = source_features(
        model,
        job.upstream,
        cache_dir=cache_dir,
        batch_size=job.batch_size,
        num_workers=job.num_workers,
        description="Upstream features + search",
    )
    for chunk in _chunks(shards):
        start = search.rows_seen
        for shard in chunk:
            shard_starts.append(start)
            start += len(shard.names)
            up_unreadable.extend(shard.unreadable)
        search.add(np.concatenate([shard.features for shard in chunk]))
    if search.rows_seen == 0:
        raise DedupInputError(f"{job.upstream.flag} {job.upstream.display_name}: none of its images is readable.")
    upstream_cache = FeatureCache(cache_dir, model, job.upstream, False)
    result = search.result()
    up_names = _upstream_names(
        upstream_cache,
        shard_starts,
        {int(row) for row in result.indices.ravel() if row >= 0} | {row for _, row, _ in result.pairs},
    )
    pairs = [
        DuplicatePair(down_names[query], up_names[row], round(similarity, 6), down_digests[query])
        for query, row, similarity in result.pairs
    ]
    record = DuplicatesRecord(
        threshold=threshold,
        model=model.name,
        pairs=pairs,
        details={
            "duplicates": len({pair.downstream for pair in pairs}),
            "downstream": {**job.downstream.record, "images": len(down_names), "unreadable": len(down_unreadable)},
            "upstream": {**job.upstream.record, "images": search.rows_seen, "unreadable": len(up_unreadable)},
            "features": {
                "model_source": model.source,
                "resolution": model.resolution,
                "flip_invariant": model.flip_invariant,
                "crop_views": list(model.crop_views),
                "dim": model.dim,
            },
            "threshold_source": "calibrated" if calibration is not None else "given",
            "calibration": calibration.to_dict() if calibration is not None else None,
            "unreadable_images": {"downstream": down_unreadable, "upstream": up_unreadable},
            "command": list(job.command),
        },
    )
    neighbours = {
        "model": model.name,
        "k": job.neighbours,
        "neighbours": [
            {
                "downstream": down_names[query],
                "nearest": [
                    {"upstream": up_names[int(row)], "similarity": round(float(value), 6)}
                    for value, row in zip(result.similarities[query], result.indices[query])
                    if row >= 0
                ],
            }
            for query in range(len(down_names))
        ],
    }
    table6_row = None
    if table6_inputs is not None:
        classifier, test_set, resolution = table6_inputs
        table6_row = evaluate_deduplicated(classifier, test_set, record, resolution, num_workers=job.num_workers)
    with atomic_directory(job.output_dir) as staging:
        write_duplicates(staging / DUPLICATES_FILE, record)
        atomic_write_json(staging / NEIGHBOURS_FILE, neighbours)
        if job.picture and pairs:
            shown = {pair.downstream for pair in pairs}, {pair.upstream for pair in pairs}
            down_sources = job.downstream.fetch(shown[0])
            up_sources = job.upstream.fetch(shown[1])
            save_pairs_picture(staging / PICTURE_FILE, pairs, down_sources.get, up_sources.get)
        if table6_row is not None:
            name = Path(job.downstream.display_name).name
            atomic_write_json(
                staging / DEDUPLICATED_RESULTS_FILE, {"test_set": name, **dataclasses.asdict(table6_row)}
            )
            atomic_write_text(staging / TABLE6_FILE, table6([(name, table6_row)]) + "\n")
    logger.info(
        "%d near-duplicate pair(s) at similarity >= %.4f: %d of %d downstream images (%.1f s).",
        len(pairs),
        threshold,
        record.details["duplicates"],
        len(down_names),
        time.perf_counter() - started,
    )
    for side, names in (("downstream", down_unreadable), ("upstream", up_unreadable)):
        if names:
            logger.info("Skipped %d unreadable %s image(s).", len(names), side)
    if table6_row is not None:
        logger.info(table6([(Path(job.downstream.display_name).name, table6_row)]))
    return DedupResult(record, table6_row, job.output_dir)


def _upstream_names(cache, shard_starts: list[int], rows: set[int]) -> dict[int, str]:
    """Names of the given upstream rows, read from the cached shards that hold them."""
    names: dict[int, str] = {}
    starts = np.asarray(shard_starts)
    by_shard: dict[int, list[int]] = {}
    for row in rows:
        by_shard.setdefault(int(np.searchsorted(starts, row, side="right") - 1), []).append(row)
    for shard, shard_rows in by_shard.items():
        shard_names = FeatureShard.read_names(cache.shard_path(shard))
        for row in shard_rows:
            names[row] = shard_names[row - shard_starts[shard]]
    return names


def default_num_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
