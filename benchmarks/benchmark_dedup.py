"""bit-dedup's two measurements: the search alone at scale, and recall / false positives on real photos.

    python benchmarks/benchmark_dedup.py search [--upstream 1000000] [--downstream 10000] [--dim 2048] [--views 2]
    python benchmarks/benchmark_dedup.py recall [--model FOLDER] [--images ../shared/data/hymenoptera]
        [--crop-views 0.8 ...]   (none after the flag: the whole image only)

`search` times `dedup.search.ExactCosineSearch` (the exact chunked search bit-dedup runs) on synthetic unit
features — the upstream generated chunk by chunk as bit-dedup streams its cached shards, generation excluded from
the time — and reports the peak memory (accelerator memory on CUDA, else the process's peak resident memory) and
the linear extrapolation to ImageNet-21k's 14.2M upstream images. `--views` is the features per image on both
sides (bit-dedup's default: the whole image and one central crop, 2; 1 is `bit-dedup --no-crop-views`).

`recall` calibrates the threshold (`dedup.calibration`) on the validation photos and measures, on the training
photos (held out from the calibration), the recall of each kind of planted near-duplicate and the false-positive
rates; it also prints the load average, since timings on a shared machine are not final.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedup.calibration import calibrate, measure, sample_images  # noqa: E402
from dedup.features import DEFAULT_CROP_VIEWS, default_device, load_feature_model  # noqa: E402
from dedup.job import SEARCH_CHUNK_ROWS  # noqa: E402
from dedup.search import DEFAULT_MEMORY_BYTES, ExactCosineSearch  # noqa: E402
from dedup.sources import FolderSource  # noqa: E402

IMAGENET21K_IMAGES = 14_197_122


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3


def unit_rows(generator: torch.Generator, rows: int, views: int, dim: int, device) -> torch.Tensor:
    """(rows, views, dim) random unit features."""
    values = torch.randn(rows, views, dim, generator=generator, device=device)
    return torch.nn.functional.normalize(values, dim=-1)


def benchmark_search(arguments) -> None:
    device = torch.device(arguments.device) if arguments.device else default_device()
    generator = torch.Generator(device=device).manual_seed(0)
    queries = unit_rows(generator, arguments.downstream, arguments.views, arguments.dim, device)
    search = ExactCosineSearch(
        queries.cpu().numpy(), k=5, threshold=0.5, device=device, memory_bytes=arguments.memory_mb * 1024**2
    )
    searched = 0.0
    baseline = peak_memory_gib(device)
    for start in range(0, arguments.upstream, SEARCH_CHUNK_ROWS):
        rows = min(SEARCH_CHUNK_ROWS, arguments.upstream - start)
        chunk = unit_rows(generator, rows, arguments.views, arguments.dim, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        search.add(chunk)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        searched += time.perf_counter() - began
    result = search.result()
    assert result.indices.shape == (arguments.downstream, 5)
    per_million = searched / arguments.upstream * 1e6
    print(
        f"search of {arguments.upstream:,} upstream x {arguments.downstream:,} downstream images ({arguments.views} "
        f"view(s) each, dim {arguments.dim}, float32) on {device} with {torch.get_num_threads()} threads: {searched:.1f} s "
        f"({per_million:.1f} s per million upstream); peak memory {peak_memory_gib(device):.2f} GiB "
        f"(before the search {baseline:.2f} GiB); load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"extrapolated to ImageNet-21k ({IMAGENET21K_IMAGES:,} images): {per_million * IMAGENET21K_IMAGES / 1e6 / 3600:.2f} h "
        "for the search (memory does not grow with the upstream size)"
    )


def benchmark_recall(arguments) -> None:
    model = load_feature_model(
        arguments.model,
        resolution=arguments.resolution,
        crop_views=arguments.crop_views,
        device=arguments.device,
    )
    images = Path(arguments.images)
    calibration_images = sample_images(FolderSource(images / "val", "val"), count=10**6)
    held_out = sample_images(FolderSource(images / "train", "train"), count=10**6)
    began = time.perf_counter()
    calibrated = calibrate(model, calibration_images)
    measured = measure(model, held_out, calibrated.threshold)
    views = ", ".join(["whole image", *(f"central {fraction:.0%}" for fraction in model.crop_views)])
    print(
        f"model {arguments.model} at {model.resolution} px, flip-invariant features, views: {views}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(f"calibrated on {images / 'val'}: {calibrated.describe()}")
    print(f"held out ({images / 'train'}): {measured.describe()}")
    print("| kind | recall (calibration photos) | recall (held-out photos) |")
    print("|---|---|---|")
    for kind in measured.recall:
        print(f"| {kind} | {calibrated.recall[kind]:.1%} | {measured.recall[kind]:.1%} |")
    print(f"({time.perf_counter() - began:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search")
    search.add_argument("--upstream", type=int, default=1_000_000)
    search.add_argument("--downstream", type=int, default=10_000)
    search.add_argument("--dim", type=int, default=2048)
    search.add_argument("--views", type=int, default=1 + len(DEFAULT_CROP_VIEWS))
    search.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_BYTES // 1024**2)
    search.add_argument("--device", default=None)
    recall = commands.add_parser("recall")
    from pretraining import embedded_checkpoint_path

    recall.add_argument("--model", default=str(embedded_checkpoint_path()))
    recall.add_argument("--resolution", type=int, default=None)
    recall.add_argument("--crop-views", type=float, nargs="*", default=list(DEFAULT_CROP_VIEWS))
    recall.add_argument(
        "--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera")
    )
    recall.add_argument("--device", default=None)
    arguments = parser.parse_args()
    (benchmark_search if arguments.command == "search" else benchmark_recall)(arguments)


if __name__ == "__main__":
    main()
