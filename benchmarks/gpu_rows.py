"""The rows of benchmarks/benchmark_gpu.py: which networks, sizes and modes, and the order they run in.

Eager rows first (parity checked on each inference scenario's networks before any of its rows), then the
trainers, then the compiled rows, smallest network first, as far as the time budget allows: a compile's
duration is learnt from the ones before it, and a row that no longer fits leaves out networks (stock first,
then timm, then the floor) or is left out altogether, saying so.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from pathlib import Path

import gpu_networks
import gpu_timing
import gpu_trainers
import torch
from gpu_timing import Mode

from finetune.preprocessing import fits_in_memory
from modeling_bit import BitConfig

# Targets: ours over each other network, at least; a trainer's images/s over the bare training step's.
TARGETS = {"floor": 0.9, "timm": 1.0, "stock": 1.0}
TRAINER_TARGET = 0.9
OTHER_NETWORKS = tuple(TARGETS)  # also the order in which a compiled row keeps networks when time is short


@dataclasses.dataclass(frozen=True)
class Scenario:
    preset: str
    image_size: int
    batch: int
    precrop: int  # the trainers' resize before the random crop (BiT-HyperRule: 448 for 384, 512 for 480)

    @property
    def title(self) -> str:
        return f"{self.preset} @{self.image_size} b{self.batch}"

    @property
    def units(self) -> int:
        return sum(BitConfig.from_preset(self.preset).depths)


@dataclasses.dataclass(frozen=True)
class Sizes:
    inference: tuple[Scenario, ...]
    training: tuple[Scenario, ...]  # the first is the one the trainers run
    finetune_images: int  # more than bit-finetune keeps in memory at the pre-crop size: decoded in the workers
    in_memory_per_class: int  # --examples-per-class of the run whose images bit-finetune decodes once
    validation_images: int
    trainer_skip: int  # steps left out of a trainer's timing (start-up, cuDNN's algorithm search)
    trainer_steps: int  # a multiple of trainer_skip: pretrain.py logs every trainer_skip steps
    warmup_calls: int
    rounds: int
    round_seconds: float


FULL = Sizes(
    inference=(
        Scenario("BiT-S-R50x1", 224, 256, 256),
        Scenario("BiT-M-R101x3", 384, 64, 448),
        Scenario("BiT-M-R152x4", 480, 16, 512),
    ),
    training=(Scenario("BiT-S-R50x1", 224, 128, 256), Scenario("BiT-M-R101x3", 384, 32, 448)),
    finetune_images=2800,  # > 2 GiB as float32 256x256 images (finetune.preprocessing.IN_MEMORY_BYTES)
    in_memory_per_class=500,
    validation_images=128,
    trainer_skip=10,
    trainer_steps=50,
    warmup_calls=3,
    rounds=5,
    round_seconds=0.25,
)
TINY = Sizes(
    inference=(Scenario("bit-tiny", 64, 4, 72),),
    training=(Scenario("bit-tiny", 64, 4, 72),),
    finetune_images=24,
    in_memory_per_class=8,
    validation_images=8,
    trainer_skip=1,
    trainer_steps=4,
    warmup_calls=1,
    rounds=2,
    round_seconds=0.0,
)
INFERENCE_MODES = (Mode("fp32", "fp32"), Mode("bf16", "bf16"), Mode("bf16 channels-last", "bf16", channels_last=True))
TRAINING_MODES = (Mode("bf16", "bf16"), Mode("bf16 channels-last", "bf16", channels_last=True))
COMPILED_MODE = Mode("bf16 channels-last compiled", "bf16", channels_last=True, compiled=True)


class Budget:
    """Wall time left (for the trainers, then the compiled rows), and what one network's compile is expected to
    take: seconds per residual unit, learnt from the compiles so far (from a first guess)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.seconds_per_unit = {"inference": 2.5, "training": 5.0}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def trainer_timeout(self) -> float:
        """A trainer run may take what is left, and at least a minute (the trainers run before compiled rows)."""
        return max(self.left(), 60.0)

    def networks_that_fit(self, names: list[str], scenario: Scenario, task: str) -> list[str]:
        return names[: int(max(self.left(), 0) // (self.seconds_per_unit[task] * scenario.units))]

    def learn(self, row: dict, scenario: Scenario) -> None:
        slowest = max(value["warmup_seconds"] for value in row["networks"].values())
        self.seconds_per_unit[row["task"]] = slowest / scenario.units


def inputs(scenario: Scenario, device: torch.device, seed: int = 1):
    generator = torch.Generator(device=device).manual_seed(seed)
    size = (scenario.batch, 3, scenario.image_size, scenario.image_size)
    pixel_values = torch.rand(size, generator=generator, device=device) * 2 - 1  # BiT's inputs are in [-1, 1]
    labels = torch.randint(0, gpu_networks.NUM_LABELS, (scenario.batch,), generator=generator, device=device)
    return pixel_values, labels


def measure_row(
    networks: dict, scenario: Scenario, mode: Mode, task: str, sizes: Sizes, backend: str | None = None
) -> dict:
    """One row: each network's images/s and peak memory in `mode`, and ours over each other network."""
    device = next(networks["ours"].parameters()).device
    pixel_values, labels = inputs(scenario, device)
    if mode.channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    steps = {}
    for name, model in networks.items():
        model = gpu_timing.prepared(model, mode, training=task == "training")
        runner = torch.compile(model, backend=backend, dynamic=False) if mode.compiled else model
        if task == "training":
            steps[name] = (gpu_timing.training_step(runner, pixel_values, labels, mode), model)
        else:
            steps[name] = (gpu_timing.inference_step(runner, pixel_values, mode), model)
    measured = gpu_timing.interleaved(
        steps,
        scenario.batch,
        device,
        warmup_calls=sizes.warmup_calls,
        rounds=sizes.rounds,
        round_seconds=sizes.round_seconds,
    )
    if mode.compiled:
        torch._dynamo.reset()  # each compiled row starts from an empty cache, far from recompilation limits
    ours = measured["ours"].images_per_second
    ratios = {name: ours / value.images_per_second for name, value in measured.items() if name != "ours"}
    return {
        "task": task,
        "network": scenario.preset,
        "image_size": scenario.image_size,
        "batch": scenario.batch,
        "mode": mode.name,
        "networks": {name: dataclasses.asdict(value) for name, value in measured.items()},
        "ours_over": ratios,
        "meets_targets": all(ratio >= TARGETS[name] for name, ratio in ratios.items()),
    }


def free(networks: dict) -> None:
    networks.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def scenarios_by_task(sizes: Sizes):
    return (("inference", sizes.inference, INFERENCE_MODES), ("training", sizes.training, TRAINING_MODES))


def eager_rows(sizes: Sizes, device: torch.device, with_timm: bool, report) -> dict:
    """Parity of every inference scenario's networks, then every eager row."""
    results = {"parity": {}, "rows": []}
    for task, scenarios, modes in scenarios_by_task(sizes):
        for scenario in scenarios:
            networks = gpu_networks.build_networks(scenario.preset, device, with_timm)
            if task == "inference":
                pixel_values, _ = inputs(scenario, device)
                parity = gpu_networks.check_parity(networks, pixel_values[:2])
                results["parity"][scenario.title] = parity
                report(f"parity {scenario.title} (fp32 / bf16): {parity}")
            for mode in modes:  # contiguous first: each layout switch copies the weights
                results["rows"].append(measure_row(networks, scenario, mode, task, sizes))
                report(row_summary(results["rows"][-1]))
            free(networks)
    return results


def compiled_rows(sizes: Sizes, device: torch.device, with_timm: bool, backend: str, budget: Budget, report) -> dict:
    results = {"rows": [], "left_out": []}
    every = [(scenario, task) for task, scenarios, _ in scenarios_by_task(sizes) for scenario in scenarios]
    names = ["ours", *[name for name in OTHER_NETWORKS if name != "timm" or with_timm]]
    # Smallest network first, inference (the shorter compile) before training at equal size.
    for scenario, task in sorted(every, key=lambda item: (item[0].units, item[1] != "inference")):
        fitting = budget.networks_that_fit(names, scenario, task)
        where = f"{task} {scenario.title} {COMPILED_MODE.name}"
        if not fitting:
            results["left_out"].append(f"{where}: --budget-seconds spent")
            report(f"left out: {results['left_out'][-1]}")
            continue
        networks = gpu_networks.build_networks(scenario.preset, device, with_timm)
        row = measure_row({name: networks[name] for name in fitting}, scenario, COMPILED_MODE, task, sizes, backend)
        if len(fitting) < len(names):
            row["left_out"] = f"{', '.join(names[len(fitting) :])}: no --budget-seconds left to compile them"
        budget.learn(row, scenario)
        results["rows"].append(row)
        report(row_summary(row))
        free(networks)
    return results


def trainer_rows(sizes: Sizes, work_dir: Path, bare_rows: list[dict], budget: Budget, report) -> dict:
    """Decode cost per image, then bit-finetune (images decoded in its workers every step, where the set is too
    large to keep in memory as the full sizes' is; images decoded once into memory) and pretrain.py
    (channels-last) on generated JPEGs, each against the bare training step of ours in the same layout
    (bit-finetune keeps the contiguous one)."""
    scenario = sizes.training[0]
    size = gpu_trainers.source_size(scenario.precrop)
    train = gpu_trainers.write_image_folder(work_dir / "train", sizes.finetune_images, size)
    validation = gpu_trainers.write_image_folder(work_dir / "validation", sizes.validation_images, size, seed=1)
    decoding = []
    for precrop, crop in sorted({(s.precrop, s.image_size) for s in (*sizes.inference, *sizes.training)}):
        folder = work_dir / f"decode-{precrop}"
        count = gpu_trainers.IMAGES_TIMED_FOR_DECODING
        gpu_trainers.write_image_folder(folder, count, gpu_trainers.source_size(precrop), seed=2)
        decoding.append(gpu_trainers.decode_cost(folder, precrop, crop))
    report(f"decode + resize per image: {decoding}")
    workers = max(1, (os.cpu_count() or 2) - 2)
    finetune = [
        "--model", scenario.preset, "--from-scratch", "--train-dir", str(train), "--validation-dir", str(validation),
        "--resolution", str(scenario.precrop), str(scenario.image_size), "--bf16",
        "--batch-size", str(scenario.batch), "--micro-batch-size", str(scenario.batch),
        "--max-steps", str(sizes.trainer_steps), "--logging-steps", str(sizes.trainer_steps),
        "--save-strategy", "no", "--report-to", "none",
    ]  # fmt: skip
    finetune_runs = [
        # In memory, bit-finetune crops in the main process unless given workers: its default is what runs.
        ("bit-finetune, images decoded once into memory", ["--examples-per-class", str(sizes.in_memory_per_class)])
    ]
    if not fits_in_memory(sizes.finetune_images, scenario.precrop):  # else bit-finetune would keep these in memory
        finetune_runs.insert(0, ("bit-finetune, images decoded in the workers", ["--num-workers", str(workers)]))
    runs = []
    for name, extra in finetune_runs:
        run_name = f"finetune-{len(runs)}"
        flags = [*finetune, *extra, "--output-dir", str(work_dir / run_name)]
        result = gpu_trainers.run_finetune(
            flags, work_dir, run_name, timeout=budget.trainer_timeout(), skip=sizes.trainer_skip
        )
        runs.append({"trainer": name, "bare_mode": "bf16", **result})
        report(f"{name}: {result}")
    pretrain = [
        "--model-preset", scenario.preset, "--train-dir", str(train), "--image-size", str(scenario.image_size),
        "--global-batch-size", str(scenario.batch), "--per-device-batch-size", str(scenario.batch),
        "--max-steps", str(sizes.trainer_steps), "--logging-steps", str(sizes.trainer_skip), "--warmup-steps", "0",
        "--checkpoint-every", str(sizes.trainer_steps), "--mixed-precision", "bf16", "--channels-last",
        "--dataloader-num-workers", str(workers),
    ]  # fmt: skip
    timeout = budget.trainer_timeout()
    result = gpu_trainers.run_pretrain(pretrain, work_dir, "pretrain", timeout=timeout, global_batch=scenario.batch)
    runs.append({"trainer": "pretrain.py --channels-last", "bare_mode": "bf16 channels-last", **result})
    report(f"pretrain.py: {result}")
    bare = {
        row["mode"]: row["networks"]["ours"]["images_per_second"]
        for row in bare_rows
        if row["task"] == "training" and row["network"] == scenario.preset and row["batch"] == scenario.batch
    }
    for run in runs:
        if "images_per_second" in run:
            run["bare_images_per_second"] = bare[run["bare_mode"]]
            run["over_bare"] = run["images_per_second"] / run["bare_images_per_second"]
            run["meets_target"] = run["over_bare"] >= TRAINER_TARGET
    return {"scenario": scenario.title, "workers": workers, "decoding": decoding, "runs": runs}


def row_summary(row: dict) -> str:
    speeds = [f"{name} {value['images_per_second']:.1f}/s" for name, value in row["networks"].items()]
    ratios = [f"ours/{name} {value:.2f} (>= {TARGETS[name]})" for name, value in row["ours_over"].items()]
    return f"{row['task']} {row['network']} @{row['image_size']} b{row['batch']} {row['mode']}: " + ", ".join(
        speeds + ratios
    )
