"""Synthetic checkpoints in the published BiT `.npz` layout (docs/recipe.md "Published checkpoints").

Random weights under the published names and TensorFlow layouts (HWIO kernels, the head as a 1x1 conv),
written from the recipe, not from the converter. Used by the conversion tests and by
`benchmarks/benchmark_convert.py`, which writes files of the real sizes one tensor at a time.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def published_arrays(depths, width: int = 1, num_classes: int = 10, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every tensor of a published BiT checkpoint, one at a time.

    Group-norm scales near 1 and non-zero shifts and head, so that a mix-up of any two tensors shows.
    """
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    yield "resnet/root_block/standardized_conv2d/kernel", normal(7, 7, 3, 64 * width)
    channels = 64 * width
    for block, depth in enumerate(depths, start=1):
        mid = 64 * width * 2 ** (block - 1)
        for unit in range(1, depth + 1):
            prefix = f"resnet/block{block}/unit{unit:02d}"
            for part, (cin, cout, k) in zip(
                "abc", ((channels, mid, 1), (mid, mid, 3), (mid, 4 * mid, 1)), strict=True
            ):
                yield f"{prefix}/{part}/group_norm/gamma", 1.0 + normal(cin, scale=0.2)
                yield f"{prefix}/{part}/group_norm/beta", normal(cin, scale=0.2)
                yield f"{prefix}/{part}/standardized_conv2d/kernel", normal(k, k, cin, cout)
            if unit == 1:
                yield f"{prefix}/a/proj/standardized_conv2d/kernel", normal(1, 1, channels, 4 * mid)
            channels = 4 * mid
    yield "resnet/group_norm/gamma", 1.0 + normal(channels, scale=0.2)
    yield "resnet/group_norm/beta", normal(channels, scale=0.2)
    yield "resnet/head/conv2d/kernel", normal(1, 1, channels, num_classes, scale=0.05)
    yield "resnet/head/conv2d/bias", normal(num_classes, scale=0.1)


def write_npz(path: Path, arrays: Iterable[tuple[str, np.ndarray]] | dict[str, np.ndarray]) -> Path:
    """Write an `.npz` as `np.savez` lays it out (uncompressed zip of `.npy` members), one array at a time.

    Members carry a fixed timestamp, so the same arrays give the same bytes (and SHA-256) on every run."""
    items = arrays.items() if isinstance(arrays, dict) else arrays
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in items:
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(member, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.asarray(array), allow_pickle=False)
    return path
