"""Measure what SCALING.md extrapolates from: training throughput per process, DDP overhead, memory.

    # images/s per process (one process, then two under torchrun + gloo; one thread each)
    OMP_NUM_THREADS=1 python pretraining/measure_scaling.py --measure throughput --preset bit-tiny --image-size 64 --batch-size 64
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 pretraining/measure_scaling.py --measure throughput \\
        --preset bit-tiny --image-size 64 --batch-size 64
    # training memory: peak resident memory at two batch sizes -> model state + memory per image
    python pretraining/measure_scaling.py --measure memory --preset BiT-M-R101x3 --image-size 224 --batch-sizes 1 2
    # exact FLOPs of a training step per image (torch's FLOP counter on the meta device: nothing allocated)
    python pretraining/measure_scaling.py --measure flops --preset BiT-M-R101x3 --image-size 224

Throughput uses random inputs (the model's step, not data loading) through accelerate exactly as
pretrain.py does (DDP under torchrun). Memory runs each batch size in a fresh process: resident memory
after a first training step is the model state; the peak during a second step above it is the step's
need; the slope over batch size is the memory per image. Prints one JSON object per measurement.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from transformers import HfArgumentParser

from modeling_bit import BitConfig, BitForImageClassification
from pretraining.recipe import BASE_LEARNING_RATE, IMAGE_SIZE, MOMENTUM, WEIGHT_DECAY


def _training_step(model, optimizer, accelerator, pixel_values, labels) -> None:
    logits = model(pixel_values=pixel_values).logits
    accelerator.backward(torch.nn.functional.cross_entropy(logits.float(), labels))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _prepared(preset: str, num_labels: int, gradient_checkpointing: bool, mixed_precision: str):
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    model = BitForImageClassification(BitConfig.from_preset(preset, num_labels=num_labels))
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=BASE_LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    return accelerator, model, optimizer


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA, XPU, MPS, ...: torch.accelerator); the CPU runs in order."""
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)


def measure_throughput(args) -> None:
    accelerator, model, optimizer = _prepared(
        args.preset, args.num_labels, args.gradient_checkpointing, args.mixed_precision
    )
    generator = torch.Generator().manual_seed(accelerator.process_index)
    pixel_values = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator) * 2 - 1
    labels = torch.randint(0, args.num_labels, (args.batch_size,), generator=generator)
    pixel_values, labels = pixel_values.to(accelerator.device), labels.to(accelerator.device)
    times = []
    for step in range(args.warmup + args.steps):
        accelerator.wait_for_everyone()
        _synchronize(accelerator.device)
        start = time.perf_counter()
        _training_step(model, optimizer, accelerator, pixel_values, labels)
        _synchronize(accelerator.device)  # an accelerator runs the step asynchronously: time its end, not its launch
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if accelerator.is_main_process:
        print(
            json.dumps(
                {
                    "measurement": "throughput",
                    "preset": args.preset,
                    "image_size": args.image_size,
                    "per_device_batch_size": args.batch_size,
                    "processes": accelerator.num_processes,
                    "threads_per_process": torch.get_num_threads(),
                    "mixed_precision": args.mixed_precision,
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "median_step_seconds": median,
                    "images_per_second_per_process": args.batch_size / median,
                    "images_per_second_total": args.batch_size * accelerator.num_processes / median,
                    "steps": args.steps,
                }
            )
        )
    accelerator.end_training()


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemorySampler:
    """Highest resident memory seen while the `with` block runs (sampled every millisecond)."""

    def __enter__(self):
        self.peak, self._running = _current_rss_bytes(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _current_rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _current_rss_bytes())


def memory_probe(args) -> None:
    """One batch size in this (fresh) process.

    A first step allocates everything that persists (weights, SGD momentum; initialisation transients are
    over by then); the resident memory after it is the model state. The peak during a second step, above
    that, is what the step needs on top: gradients, saved activations, temporaries.
    """
    baseline = _current_rss_bytes()
    accelerator, model, optimizer = _prepared(
        args.preset, args.num_labels, args.gradient_checkpointing, args.mixed_precision
    )
    parameters = sum(p.numel() for p in model.parameters())
    pixel_values = torch.rand(args.batch_size, 3, args.image_size, args.image_size) * 2 - 1
    labels = torch.randint(0, args.num_labels, (args.batch_size,))
    _training_step(model, optimizer, accelerator, pixel_values, labels)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed step memory back, so resident = live
    state = _current_rss_bytes()
    start = time.perf_counter()
    with PeakMemorySampler() as sampler:
        _training_step(model, optimizer, accelerator, pixel_values, labels)
    print(
        json.dumps(
            {
                "batch_size": args.batch_size,
                "parameters": parameters,
                "state_bytes": state - baseline,
                "step_bytes": sampler.peak - state,
                "seconds_per_step": time.perf_counter() - start,
            }
        )
    )


def measure_memory(args) -> None:
    rows = []
    for batch_size in args.batch_sizes:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--measure",
            "memory-probe",
            "--preset",
            args.preset,
            "--image-size",
            str(args.image_size),
            "--batch-size",
            str(batch_size),
            "--num-labels",
            str(args.num_labels),
            "--mixed-precision",
            args.mixed_precision,
        ]
        if args.gradient_checkpointing:
            command.append("--gradient-checkpointing")
        # Every large tensor gets its own mapping, returned to the system when freed: resident memory then
        # follows live memory instead of glibc's cached arenas.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        completed = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    small, large = rows
    per_image = (large["step_bytes"] - small["step_bytes"]) / (large["batch_size"] - small["batch_size"])
    if large["step_bytes"] <= small["step_bytes"] * 1.02:
        # At small batches the step's peak is the end of the backward pass (all gradients live), not the
        # activations: the slope is then meaningless.
        raise SystemExit(
            f"Activations did not set the peak at batch sizes {args.batch_sizes} (step peaks {small['step_bytes']} and "
            f"{large['step_bytes']} bytes): measure again with larger --batch-sizes."
        )
    print(
        json.dumps(
            {
                "measurement": "memory",
                "preset": args.preset,
                "image_size": args.image_size,
                "mixed_precision": args.mixed_precision,
                "gradient_checkpointing": args.gradient_checkpointing,
                "parameters": small["parameters"],
                "rows": rows,
                "bytes_per_image": per_image,
                # model state (weights, momentum) + what a step needs whatever the batch (gradients, temporaries)
                "fixed_bytes": small["state_bytes"] + small["step_bytes"] - small["batch_size"] * per_image,
            }
        )
    )


def count_flops(args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = BitForImageClassification(BitConfig.from_preset(args.preset))
        pixel_values = torch.empty(1, 3, args.image_size, args.image_size)
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(pixel_values=pixel_values)
    with FlopCounterMode(display=False) as training:
        model(pixel_values=pixel_values).logits.sum().backward()
    print(
        json.dumps(
            {
                "measurement": "flops",
                "preset": args.preset,
                "image_size": args.image_size,
                "parameters": sum(p.numel() for p in model.parameters()),
                "forward_flops_per_image": forward.get_total_flops(),
                "training_flops_per_image": training.get_total_flops(),
            }
        )
    )


@dataclasses.dataclass
class MeasureArguments:
    measure: Literal["throughput", "memory", "flops", "memory-probe"] = dataclasses.field(
        metadata={"help": "What to measure (memory-probe: one batch size, run by `memory` in a fresh process)."}
    )
    preset: str = "bit-tiny"
    image_size: int = IMAGE_SIZE
    batch_size: int = 8
    batch_sizes: list[int] = dataclasses.field(
        default_factory=lambda: [1, 2], metadata={"help": "Two sizes, for memory."}
    )
    num_labels: int = 1000
    steps: int = 10
    warmup: int = 3
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(MeasureArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    if args.measure == "memory" and (len(args.batch_sizes) != 2 or args.batch_sizes[0] >= args.batch_sizes[1]):
        raise ValueError(f"--batch-sizes {args.batch_sizes}: give two increasing batch sizes.")
    commands = {
        "throughput": measure_throughput,
        "memory": measure_memory,
        "memory-probe": memory_probe,
        "flops": count_flops,
    }
    commands[args.measure](args)


if __name__ == "__main__":
    main()
