"""The data side of benchmarks/benchmark_gpu.py: generated JPEGs, the decode + resize cost per image, and short
real runs of bit-finetune and pretrain.py with their images per second and time spent waiting for data.

Each trainer runs in a fresh process, as a user starts it. bit-finetune runs here (`python gpu_trainers.py
finetune RESULT.json SKIP -- FLAGS`) with a callback that times its optimizer steps: images per second after the
first steps (start-up, cuDNN's algorithm search), and the share of that time between one step's end and the next
one's start, where the Trainer fetches the step's batches. pretrain.py runs as itself and logs both figures in
its training_log.jsonl (`images_per_second`, `data_wait_fraction`).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

REPO_ROOT = Path(__file__).resolve().parents[1]
JPEG_QUALITY = 90
IMAGES_TIMED_FOR_DECODING = 32


def photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    """A JPEG-friendly stand-in for a photo: smooth colour fields with a little grain (noise alone would compress
    and decode unlike photos)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def _write_jpeg(job: tuple[str, tuple[int, int], int]) -> None:
    path, size, seed = job
    photo_like(size, seed).save(path, quality=JPEG_QUALITY)


def write_image_folder(root: Path, count: int, size: tuple[int, int], classes: int = 2, seed: int = 0) -> Path:
    """`count` JPEGs of `size` (width, height) in `classes` class folders under `root`, written by threads (Pillow
    releases the GIL while it resizes and encodes; threads, unlike forked processes, are safe beside CUDA)."""
    jobs = []
    for index in range(count):
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{index}.jpg"), size, seed * 1_000_003 + index))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_jpeg, jobs))
    return root


def source_size(precrop: int) -> tuple[int, int]:
    """A 4:3 photo whose short side is the pre-crop size (BiT-HyperRule resizes it to a precrop square)."""
    return (precrop * 4 // 3, precrop)


def decode_cost(folder: Path, precrop: int, crop: int) -> dict:
    """Milliseconds per image, one process, through the trainers' own code: bit-finetune's (decode, resize to the
    pre-crop square, random crop and flip) and pretrain.py's (decode, inception crop, resize to the crop size)."""
    from finetune.preprocessing import decode_example, random_crop_and_flip
    from modeling_bit import bit_image_processor
    from pretraining.data import BatchBuilder, LabelSpace

    paths = sorted(folder.rglob("*.jpg"))[:IMAGES_TIMED_FOR_DECODING]
    examples = [{"image": {"path": str(path), "bytes": None}, "label": 0} for path in paths]
    processor = bit_image_processor(precrop)
    rng = np.random.default_rng(0)

    def finetune_decode():
        for index, example in enumerate(examples):
            item = decode_example(example, index, precrop, processor)
            random_crop_and_flip(item["pixel_values"], crop, rng, flip=True)

    builder = BatchBuilder("image", "label", LabelSpace(2, ["a", "b"], False), crop, seed=0, train=True)

    def pretrain_decode():
        builder([(example, (index,)) for index, example in enumerate(examples)])

    costs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as in a DataLoader worker
    try:
        for name, decode in (("finetune_ms_per_image", finetune_decode), ("pretrain_ms_per_image", pretrain_decode)):
            decode()  # file cache, first-call set-up
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                decode()
                seconds.append(time.perf_counter() - start)
            costs[name] = statistics.median(seconds) / len(examples) * 1000
    finally:
        torch.set_num_threads(threads)
    return {"source_size": list(source_size(precrop)), "precrop": precrop, "crop": crop, **costs}


def subprocess_env(work_dir: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(work_dir / "datasets-cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_logged(command: list[str], work_dir: Path, log_name: str, timeout: float) -> str | None:
    """Run `command`; None if it succeeded, else what went wrong with the end of its output (the scratch folder
    that holds the whole log may be gone by the time anyone reads the results)."""
    log = work_dir / log_name
    with open(log, "w") as output:
        try:
            status = subprocess.run(
                command, stdout=output, stderr=subprocess.STDOUT, env=subprocess_env(work_dir), timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            status = None
    if status == 0:
        return None
    what = f"stopped after {timeout:.0f} s" if status is None else f"exit status {status}"
    return f"{what}: " + " | ".join(log.read_text().strip().splitlines()[-8:])


def run_finetune(flags: list[str], work_dir: Path, name: str, timeout: float, skip: int) -> dict:
    """bit-finetune with `flags` in a fresh process; its steps after the first `skip` timed (`StepClock`), or the
    error."""
    result_path = work_dir / f"{name}.json"
    command = [sys.executable, str(Path(__file__)), "finetune", str(result_path), str(skip), "--", *flags]
    error = run_logged(command, work_dir, f"{name}.log", timeout)
    return {"error": error} if error else json.loads(result_path.read_text())


def run_pretrain(flags: list[str], work_dir: Path, name: str, timeout: float, global_batch: int) -> dict:
    """pretrain.py with `flags` (an --output-dir in `work_dir`); images per second and data wait over its log
    entries after the first (which holds the start-up)."""
    output_dir = work_dir / name
    command = [sys.executable, "-m", "pretraining.pretrain", *flags, "--output-dir", str(output_dir)]
    error = run_logged(command, work_dir, f"{name}.log", timeout)
    if error:
        return {"error": error}
    entries = [json.loads(line) for line in (output_dir / "training_log.jsonl").read_text().splitlines()]
    steps = [entry["step"] - previous["step"] for previous, entry in zip(entries, entries[1:])]
    timed = entries[1:]
    if not timed:
        return {"error": "pretrain.py logged fewer than two entries: give more --max-steps per --logging-steps"}
    seconds = [count * global_batch / entry["images_per_second"] for count, entry in zip(steps, timed)]
    return {
        "steps_timed": sum(steps),
        "images_per_second": sum(steps) * global_batch / sum(seconds),
        "data_wait_fraction": sum(entry["data_wait_fraction"] * s for entry, s in zip(timed, seconds)) / sum(seconds),
    }


class StepClock(TrainerCallback):
    """Times bit-finetune's optimizer steps after the first `skip`: images per second, and the share of that time
    between a step's end and the next one's start (where the Trainer fetches the step's batches; logging and
    checkpoints would land there too, which the benchmark's runs keep out)."""

    def __init__(self, skip: int):
        self.skip = skip
        self.started: float | None = None
        self.last_end: float | None = None
        self.steps, self.waiting, self.batch = 0, 0.0, 0

    @staticmethod
    def _now(args) -> float:
        if args.device.type == "cuda":  # the GPU work queued by the step is part of the step
            torch.cuda.synchronize(args.device)
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        now = self._now(args)
        if self.started is not None:
            self.waiting += now - self.last_end

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now(args)
        self.batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if state.global_step == self.skip:
            self.started = now
        elif state.global_step > self.skip:
            self.steps += 1
        self.last_end = now

    def result(self) -> dict:
        if not self.steps:
            return {"error": f"bit-finetune ran no more than the {self.skip} steps left out of the timing"}
        elapsed = self.last_end - self.started
        return {
            "steps_timed": self.steps,
            "images_per_second": self.steps * self.batch / elapsed,
            "data_wait_fraction": self.waiting / elapsed,
        }


def finetune_process(result_path: str, skip: int, flags: list[str]) -> None:
    from finetune import cli

    clock = StepClock(skip)
    status = cli.main(flags, callbacks=[clock])
    if status != 0:
        sys.exit(status)
    Path(result_path).write_text(json.dumps(clock.result()))


if __name__ == "__main__":
    # gpu_trainers.py finetune RESULT.json SKIP -- BIT_FINETUNE_FLAGS...
    separator = sys.argv.index("--")
    mode, result, skip = sys.argv[1:separator]
    if mode != "finetune":
        sys.exit(f"gpu_trainers.py: unknown mode {mode!r}; expected: finetune RESULT.json SKIP -- FLAGS")
    finetune_process(result, int(skip), sys.argv[separator + 1 :])
