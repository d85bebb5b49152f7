"""Timing for benchmarks/benchmark_gpu.py: inference and training steps, interleaved rounds, peak device memory.

Every network of a row is warmed up first (cuDNN's algorithm search, our cached standardized kernels, a compiled
graph), then timed in rounds, one network after the other in each round, so that clock and thermal drift hit all
alike; a network's figure is the median of its rounds. Peak memory is the network's own parameters plus the most
the row allocated on top of what was resident before it (activations, gradients, optimizer state, caches).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import torch
from gpu_networks import autocast_for, cross_entropy, logits_of
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class Mode:
    """How a row runs the networks: precision, memory layout, compiled or eager."""

    name: str
    precision: str  # "fp32" or "bf16" (autocast, float32 master weights)
    channels_last: bool = False
    compiled: bool = False


@dataclasses.dataclass
class Measured:
    images_per_second: float
    peak_memory_gb: float | None  # None on a CPU
    warmup_seconds: float  # the first call included: a compiled network's compile time


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes(model: nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in [*model.parameters(), *model.buffers()])


def prepared(model: nn.Module, mode: Mode, training: bool) -> nn.Module:
    """The network in the row's layout (changed in place, as users do it) and train/eval mode, which also drops
    our cached kernels: each row builds its own, and their memory counts there."""
    model.to(memory_format=torch.channels_last if mode.channels_last else torch.contiguous_format)
    return model.train(training)


def inference_step(model: nn.Module, pixel_values: Tensor, mode: Mode) -> Callable[[], None]:
    def step():
        with torch.inference_mode(), autocast_for(mode.precision, pixel_values.device):
            logits_of(model, pixel_values)

    return step


def training_step(model: nn.Module, pixel_values: Tensor, labels: Tensor, mode: Mode) -> Callable[[], None]:
    """Forward, backward and an SGD step with momentum (BiT's optimizer, docs/recipe.md)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        with autocast_for(mode.precision, pixel_values.device):
            logits = logits_of(model, pixel_values)
        cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def warm_up(
    step: Callable[[], None], model: nn.Module, device: torch.device, calls: int
) -> tuple[float, float | None]:
    """(seconds of the warm-up, peak memory in GB), after `calls` calls of `step`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident_before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type != "cuda":
        return seconds, None
    peak = resident_bytes(model) + torch.cuda.max_memory_allocated(device) - resident_before
    return seconds, peak / 1024**3


def seconds_per_call(step: Callable[[], None], device: torch.device, calls: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def interleaved(
    steps: dict[str, tuple[Callable[[], None], nn.Module]],
    batch: int,
    device: torch.device,
    *,
    warmup_calls: int,
    rounds: int,
    round_seconds: float,
) -> dict[str, Measured]:
    """Images per second of each named (step, model): warmed up, then timed in interleaved rounds."""
    warmed, calls_per_round = {}, {}
    for name, (step, model) in steps.items():
        warmed[name] = warm_up(step, model, device, warmup_calls)
        one_call = seconds_per_call(step, device, 1)
        calls_per_round[name] = max(1, math.ceil(round_seconds / max(one_call, 1e-6)))
    timings = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, _) in steps.items():
            timings[name].append(seconds_per_call(step, device, calls_per_round[name]))
    return {
        name: Measured(batch / statistics.median(timings[name]), warmed[name][1], warmed[name][0]) for name in steps
    }
