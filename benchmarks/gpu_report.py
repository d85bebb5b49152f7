"""What benchmarks/benchmark_gpu.py writes: the environment it ran in and the markdown table of its results."""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import sys

import torch
import transformers
from gpu_rows import OTHER_NETWORKS, TARGETS, TRAINER_TARGET


def environment(device: torch.device) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "transformers": transformers.__version__,
        "timm": importlib.metadata.version("timm") if importlib.util.find_spec("timm") else None,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }


def _number(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _speed_cell(measured: dict | None) -> str:
    if measured is None:
        return "–"
    speed = _number(measured["images_per_second"])
    memory = measured["peak_memory_gb"]
    return speed if memory is None else f"{speed} ({memory:.1f})"


def scenario_order(rows: list[dict]) -> list[dict]:
    """Rows grouped by task and scenario in the order they first ran, each group's compiled row (run last) last."""
    first = {}
    for row in rows:
        first.setdefault((row["task"], row["network"], row["image_size"], row["batch"]), len(first))
    return sorted(rows, key=lambda row: first[(row["task"], row["network"], row["image_size"], row["batch"])])


def model_table(rows: list[dict]) -> list[str]:
    targets = " | ".join(f"ours/{name} (≥ {TARGETS[name]:g})" for name in OTHER_NETWORKS)
    lines = [
        f"| task | network | mode | ours | {' | '.join(OTHER_NETWORKS)} | {targets} |",
        "|---" * (4 + 2 * len(OTHER_NETWORKS)) + "|",
    ]
    for row in scenario_order(rows):
        cells = [_speed_cell(row["networks"].get(name)) for name in ("ours", *OTHER_NETWORKS)]
        ratios = [_number(row["ours_over"].get(name), 2) for name in OTHER_NETWORKS]
        where = f"{row['network']} @{row['image_size']} b{row['batch']}"
        lines.append(f"| {row['task']} | {where} | {row['mode']} | " + " | ".join(cells + ratios) + " |")
    return lines


def parity_line(parity: dict) -> str:
    return (
        "Parity, max |logits − ours| / max |ours| (float32 with TF32 off, ≤ 1e-4 / bf16 autocast, ≤ 1e-2): "
        + "; ".join(
            f"{title}: " + ", ".join(f"{name} {v['fp32']:.1e} / {v['bf16']:.1e}" for name, v in networks.items())
            for title, networks in parity.items()
        )
    )


def trainer_table(trainers: dict) -> list[str]:
    lines = [
        f"Trainers, {trainers['scenario']}, bf16, generated JPEGs, {trainers['workers']} DataLoader workers where "
        f"the images are decoded every step (target: ≥ {TRAINER_TARGET:g} × the bare training step of ours in the "
        "same layout):",
        "",
        "| run | images/s | waiting for data | bare step, images/s | run / bare step |",
        "|---|---|---|---|---|",
    ]
    for run in trainers["runs"]:
        if "error" in run:
            lines.append(f"| {run['trainer']} | failed: {run['error']} | | | |")
        else:
            lines.append(
                f"| {run['trainer']} | {_number(run['images_per_second'])} | {run['data_wait_fraction']:.0%} | "
                f"{_number(run['bare_images_per_second'])} | {run['over_bare']:.2f} |"
            )
    lines += [
        "",
        "Decode + resize per image, one CPU core, the trainers' own code (generated 4:3 JPEGs, quality 90):",
        "",
        "| source JPEG → crop | bit-finetune: resize to the pre-crop, random crop | pretrain.py: inception crop, resize |",
        "|---|---|---|",
    ]
    for entry in trainers["decoding"]:
        width, height = entry["source_size"]
        lines.append(
            f"| {width}×{height} → {entry['crop']} | {entry['finetune_ms_per_image']:.2f} ms | "
            f"{entry['pretrain_ms_per_image']:.2f} ms |"
        )
    return lines


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"{env['gpu'] or 'CPU only (' + env['cpu'] + ')'}, {env['cpu_cores']} CPU cores; torch {env['torch']} "
        f"(CUDA {env['cuda']}), transformers {env['transformers']}, timm {env['timm'] or 'not installed'}; "
        f"{env['date']}. Images/s: median of interleaved rounds; peak GPU memory in GiB in brackets. The floor is "
        "ours with pre-standardized plain convolutions. fp32 rows run with PyTorch's defaults (TF32 convolutions).",
        "",
        *model_table(results["rows"]),
    ]
    left_out = results["left_out"] + [
        f"{row['task']} {row['network']} @{row['image_size']} b{row['batch']} {row['mode']}: {row['left_out']}"
        for row in results["rows"]
        if "left_out" in row
    ]
    if left_out:
        lines += ["", "Left out: " + "; ".join(left_out)]
    lines += ["", parity_line(results["parity"])]
    if "trainers" in results:
        lines += ["", *trainer_table(results["trainers"])]
    return "\n".join(lines) + "\n"
