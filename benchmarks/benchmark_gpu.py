"""GPU speed of our BiT against timm's and stock transformers', and of bit-finetune and pretrain.py, on one GPU.

    python benchmarks/benchmark_gpu.py --output-dir results                  # one GPU, under 8 minutes
    python benchmarks/benchmark_gpu.py --tiny --device cpu --output-dir out  # the same code at tiny sizes, seconds

Writes results/benchmark_gpu.json and results/benchmark_gpu.md (the README's table), and prints the table.

What it needs, checked first (it stops at once with a list of what is missing):
  - PyTorch with CUDA (Triton for the compiled rows), timm (which needs torchvision), and this repository's
    requirements at the versions pyproject.toml pins: transformers >= 5.24, accelerate, datasets, evaluate, ...
    In the repository: `pip install -e .` (or the repository on PYTHONPATH with those packages installed).
  - A GPU machine without network and with an older transformers: bring wheels. On a machine with pip, in the
    repository (the H200 machine runs CPython 3.12):
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \\
            transformers==5.24.0 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
    then on the GPU machine, in the repository:
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
        PYTHONPATH=$PWD:/tmp/site python3 benchmarks/benchmark_gpu.py --output-dir results

Rows, each with our network, the floor (the same network with pre-standardized plain convolutions), stock
transformers' BitForImageClassification and timm's resnetv2_*_bit, all holding the same weights (their logits
checked against ours first: <= 1e-4 relative in float32, <= 1e-2 under bf16 autocast):
  - inference images/s, fp32 / bf16 autocast / + channels-last / + torch.compile: R50x1 @224 batch 256,
    R101x3 @384 batch 64, R152x4 @480 batch 16;
  - training step images/s (forward, backward, SGD with momentum), bf16 autocast, contiguous / channels-last /
    + torch.compile: R50x1 @224 batch 128, R101x3 @384 batch 32;
  - peak GPU memory of each;
  - bit-finetune's and pretrain.py's own images/s in short real runs on generated JPEGs, with the share of the
    time spent waiting for data, and the decode + resize cost per image on one CPU core.
Targets, printed beside each row: ours >= timm and >= stock, ours >= 90% of the floor, the trainers >= 90% of
the bare training step. Compiled rows run last, as far as --budget-seconds allows; a row left out says why.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> list[str]:
    """The `dependencies` of pyproject.toml, as requirement strings."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return re.findall(r'^\s*"([^"]+)"', block, re.M)


def missing_requirements(device: str, need_timm: bool, compile_backend: str) -> list[str]:
    """What this run needs and does not have, each with how to bring it."""
    from packaging.requirements import Requirement

    problems = []
    for line in pyproject_requirements():
        requirement = Requirement(line)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} is not installed (pyproject.toml needs {line})")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement.name} {installed} is installed; pyproject.toml needs {line}")
    # Installed is not enough: e.g. datasets with too old a pyarrow fails only when imported.
    for name in ("transformers", "accelerate", "datasets", "evaluate", *(["timm"] if need_timm else [])):
        if importlib.util.find_spec(name) is None:
            if name == "timm":
                problems.append("timm is not installed: pip install timm (it needs torchvision)")
            continue  # listed above, from pyproject.toml
        try:
            importlib.import_module(name)
        except Exception as error:  # whatever a broken install raises, it is reported with the rest
            problems.append(f"{name} does not import: {type(error).__name__}: {error}")
    spec = importlib.util.find_spec("modeling_bit")
    if spec is None or not Path(spec.origin).resolve().is_relative_to(REPO_ROOT):
        problems.append(
            f"modeling_bit does not come from {REPO_ROOT}: pip install -e . there, or put it on PYTHONPATH"
        )
    if importlib.util.find_spec("torch") is None:
        return problems  # listed above; nothing more can be checked
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        problems.append("no CUDA device: this PyTorch sees no GPU (for the CPU check: --tiny --device cpu)")
    if compile_backend == "inductor":
        if device == "cuda" and importlib.util.find_spec("triton") is None:
            problems.append("triton is not installed: torch.compile's inductor needs it on CUDA")
        if device == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
            problems.append(
                "no C++ compiler: torch.compile's inductor needs one on CPU (or --compile-backend aot_eager)"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="where benchmark_gpu.json and benchmark_gpu.md go")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny networks and runs: the same code in seconds")
    parser.add_argument(
        "--budget-seconds", type=float, default=450, help="wall time after which no compiled row starts (default: 450)"
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (default: inductor)")
    parser.add_argument("--work-dir", help="scratch folder for the images and trainer runs (default: a temporary one)")
    args = parser.parse_args(argv)

    problems = missing_requirements(args.device, need_timm=not args.tiny, compile_backend=args.compile_backend)
    if problems:
        print("benchmark_gpu.py cannot run:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        print("The top of benchmarks/benchmark_gpu.py says how to bring what is missing.", file=sys.stderr)
        return 2
    # Only now: a missing or old package is reported above, not raised from deep inside an import.
    import gpu_networks
    import gpu_report
    import gpu_rows
    import torch

    from modeling_bit.file_utils import atomic_write_json, atomic_write_text

    sizes = gpu_rows.TINY if args.tiny else gpu_rows.FULL
    device = torch.device(args.device)
    with_timm = gpu_networks.timm_is_installed()
    budget = gpu_rows.Budget(args.budget_seconds)
    started = time.monotonic()

    def report(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {line}", flush=True)

    results = {"environment": gpu_report.environment(device)}
    report(json.dumps(results["environment"]))
    if not with_timm:
        report("timm is not installed: its rows are left out")
    eager = gpu_rows.eager_rows(sizes, device, with_timm, report)
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="benchmark-gpu-"))
    try:
        results["trainers"] = gpu_rows.trainer_rows(sizes, work_dir, eager["rows"], budget, report)
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    compiled = gpu_rows.compiled_rows(sizes, device, with_timm, args.compile_backend, budget, report)
    results.update(parity=eager["parity"], rows=eager["rows"] + compiled["rows"], left_out=compiled["left_out"])
    results["seconds"] = time.monotonic() - started
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / "benchmark_gpu.json", results)
    table = gpu_report.markdown(results)
    atomic_write_text(output_dir / "benchmark_gpu.md", table)
    print(table)
    failures = gpu_networks.parity_failures(results["parity"])
    if failures:
        print("benchmark_gpu.py: parity failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
