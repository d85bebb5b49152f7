"""Time and memory of `bit-convert` for every published architecture, on synthetic files of the real size.

    python benchmarks/benchmark_convert.py [--architectures R50x1 R152x4] [--workdir /tmp] [--classes 21843]

For each architecture a `.npz` in the published layout (random weights, BiT-M's 21,843-class head by default,
so the largest files) is written to a temporary folder, tensor by tensor, and converted by
`bit-convert`'s `main` (`model_cards.bit_convert.main`, card included) in a fresh process, which reports the wall time of the conversion (after the
imports), of the whole process, and its peak resident memory (VmHWM, Linux). The baseline is the peak memory of
the same process importing everything and converting nothing. Files are deleted after each architecture. The
synthetic file was just written, so it is read from the page cache, as a freshly downloaded file would be.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]  # the package, and the synthetic-checkpoint writer

from published_layout import published_arrays, write_npz  # noqa: E402

from modeling_bit.configuration_bit import PUBLISHED_ARCHITECTURES, RESNET_DEPTHS  # noqa: E402

ARCHITECTURES = {f"R{depth}x{width}": (RESNET_DEPTHS[depth], width) for depth, width in PUBLISHED_ARCHITECTURES}

# Peak memory is VmHWM, the high-water mark of this process's own address space: ru_maxrss would also count
# the parent's, which the child shares between fork and exec.
_MEASURE = """
import re, sys, time
start = time.perf_counter()
from model_cards.bit_convert import main
imported = time.perf_counter()
if sys.argv[1:]:
    assert main(sys.argv[1:]) == 0
done = time.perf_counter()
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print("MEASURE", imported - start, done - imported, peak_kib * 1024)
"""


def write_synthetic_npz(path: Path, depths, width: int, num_classes: int) -> tuple[int, int]:
    """Write the file one tensor at a time; return the parameter count and the largest tensor's bytes."""
    sizes = []

    def counted(arrays):
        for name, array in arrays:
            sizes.append(array.nbytes)
            yield name, array

    write_npz(path, counted(published_arrays(depths, width, num_classes)))
    return sum(sizes) // 4, max(sizes)


def measure(arguments: list[str]) -> tuple[float, float, int]:
    """(import seconds, conversion seconds, peak RSS bytes) of a fresh process converting with `arguments`."""
    completed = subprocess.run(
        [sys.executable, "-c", _MEASURE, *arguments],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr)
    import_seconds, seconds, peak = completed.stdout.split("MEASURE")[-1].split()
    return float(import_seconds), float(seconds), int(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--classes", type=int, default=21843, help="head size (BiT-M: 21843, BiT-S: 1000)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary files go")
    args = parser.parse_args()

    import_seconds, _, baseline = measure([])
    print(
        f"{platform.machine()} CPU x{os.cpu_count()}, python {platform.python_version()}; "
        f"import only: {import_seconds:.1f} s, peak RSS {baseline / 2**30:.2f} GiB"
    )
    rows = []
    for name in args.architectures:
        depths, width = ARCHITECTURES[name]
        folder = Path(tempfile.mkdtemp(prefix=f"bit-convert-{name}-", dir=args.workdir))
        try:
            start = time.perf_counter()
            parameters, largest = write_synthetic_npz(folder / f"{name}.npz", depths, width, args.classes)
            written = time.perf_counter() - start
            import_seconds, seconds, peak = measure(
                [str(folder / f"{name}.npz"), "--output", str(folder / "converted")]
            )
            size = (folder / f"{name}.npz").stat().st_size
            row = {
                "architecture": name,
                "parameters": parameters,
                "npz_GiB": size / 2**30,
                "conversion_seconds": seconds,
                "process_seconds": import_seconds + seconds,
                "peak_rss_GiB": peak / 2**30,
                "above_baseline_GiB": (peak - baseline) / 2**30,
                "largest_tensor_GiB": largest / 2**30,
                "synthesis_seconds": written,
            }
            rows.append(row)
            print(json.dumps(row))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print(
        "\n| architecture | parameters (with head) | `.npz` | conversion | whole process | peak RSS | largest tensor |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['architecture']} | {row['parameters'] / 1e6:,.0f} M | {row['npz_GiB']:.2f} GiB | "
            f"{row['conversion_seconds']:.1f} s | {row['process_seconds']:.1f} s | {row['peak_rss_GiB']:.2f} GiB | "
            f"{row['largest_tensor_GiB']:.2f} GiB |"
        )


if __name__ == "__main__":
    main()
