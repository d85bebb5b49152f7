"""Speed and memory of bit-finetune's whole training loop against a plain `transformers.Trainer` over stock
transformers' BiT, in one run.

    python benchmarks/benchmark_finetune.py [--preset BiT-S-R50x1] [--steps 30] [--batch-size 16]
        [--resolution 160 128] [--workers 2] [--rounds 2] [--images DIR] [--json FILE]

Both loops train the same architecture (random weights from the same seed) on the same real photographs
(`../shared/data/hymenoptera/train` by default: JPEGs of 193x130 to 2592x1944 pixels) with the same
preprocessing (resize to the pre-crop with PIL, random square crop, random horizontal flip, [-1, 1]), batch,
SGD with momentum and DataLoader workers:

- ours: bit-finetune's loop (`finetune.engine`) as `bit-finetune` runs it by default: BiT-HyperRule's data
  pipeline (a small training set is decoded and resized once into memory by the workers, then cropped and
  flipped per step in the training process), MixUp (alpha 0.1), `BitTrainer`, our model;
- stock: `transformers.Trainer` with stock `BitForImageClassification`, the images decoded, resized, cropped and
  flipped with PIL in the workers at every step, as the HF image-classification example's transforms do.

Each loop runs in a fresh process (so each peak resident memory is its own); rounds alternate between the two.
Images per second count the steps after the first `--warmup-steps`; ours also reports the one-time decode of
the training set into memory, which a run of the rule's 500 steps pays once. Peak memory is the training
process's peak resident set size; the DataLoader workers' largest is shown beside it.

Target (on a 2-core CPU): ours >= 1.15x stock's images/s, peak memory <= stock's.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "data" / "hymenoptera" / "train"
LEARNING_RATE = 0.003
MOMENTUM = 0.9


class StepTimer(TrainerCallback):
    """When the training began and when each optimizer step ended."""

    def __init__(self):
        self.began: float | None = None
        self.ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def images_per_second(ends: list[float], warmup: int, batch: int) -> float:
    timed = ends[warmup:]
    return batch * (len(timed) - 1) / (timed[-1] - timed[0])


def run_ours(options) -> dict:
    from finetune.data import load_image_folders
    from finetune.engine import FinetuneJob, run_finetuning

    started = time.perf_counter()
    data = load_image_folders(options.images, validation_fraction=0.1, seed=0)
    precrop, crop = options.resolution
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as work_dir:
        job = FinetuneJob(
            model=options.preset,
            from_scratch=True,
            data=data,
            rule_overrides={
                "steps": options.steps,
                "batch_size": options.batch_size,
                "micro_batch_size": options.batch_size,
                "precrop": precrop,
                "crop": crop,
                "mixup_alpha": 0.1,
                "learning_rate": LEARNING_RATE,
            },
            work_dir=work_dir,
            # The workers decode the training set once; its in-memory images are then cropped in this process.
            training={"eval_strategy": "no"},
            save_checkpoints=False,
            quiet=True,
        )
        run_finetuning(job, callbacks=[timer])
    return {
        "images_per_second": images_per_second(timer.ends, options.warmup_steps, options.batch_size),
        # Loading, planning and the decode of the training set into memory, before the first step.
        "decode_seconds": timer.began - started,
    }


def run_stock(options) -> dict:
    import datasets
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    from modeling_bit import BitConfig

    torch.manual_seed(0)
    config = BitConfig.from_preset(options.preset, num_labels=2)
    model = transformers.BitForImageClassification(transformers.BitConfig(**config.to_dict()))
    precrop, crop = options.resolution
    dataset = datasets.load_dataset("imagefolder", data_dir=str(options.images), split="train")
    rng = np.random.default_rng(0)

    def transform(batch):
        pixel_values = []
        for image in batch["image"]:
            image = image.convert("RGB").resize((precrop, precrop), Image.BILINEAR)
            top, left = (int(value) for value in rng.integers(0, precrop - crop + 1, 2))
            image = image.crop((left, top, left + crop, top + crop))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
            pixel_values.append(torch.from_numpy(array).permute(2, 0, 1))
        return {"pixel_values": pixel_values, "labels": batch["label"]}

    def collate(examples):
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples]),
        }

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir,
            max_steps=options.steps,
            per_device_train_batch_size=options.batch_size,
            learning_rate=LEARNING_RATE,
            optim="sgd",
            optim_args=f"momentum={MOMENTUM}",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            dataloader_num_workers=options.workers,
            remove_unused_columns=False,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            seed=0,
        )
        trainer = transformers.Trainer(
            model, args, train_dataset=dataset.with_transform(transform), data_collator=collate, callbacks=[timer]
        )
        trainer.train()
    return {"images_per_second": images_per_second(timer.ends, options.warmup_steps, options.batch_size)}


def measure(side: str, options) -> dict:
    """One loop in this process, then its peak memory."""
    result = run_ours(options) if side == "ours" else run_stock(options)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def in_fresh_process(side: str, argv: list[str]) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--side", side, *argv], capture_output=True, text=True, cwd=REPO_ROOT
    )
    if completed.returncode != 0:
        raise SystemExit(f"the {side} loop failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def parse_arguments(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="BiT-S-R50x1", help="Architecture of both loops.")
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per loop.")
    parser.add_argument("--warmup-steps", type=int, default=5, help="Steps left out of the timing.")
    parser.add_argument("--batch-size", type=int, default=16, help="Images per step (one forward pass).")
    parser.add_argument("--resolution", type=int, nargs=2, default=[160, 128], metavar=("PRECROP", "CROP"))
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of both loops.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds; medians are reported.")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="Image folder (one subfolder a class).")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--side", choices=("ours", "stock"), help=argparse.SUPPRESS)  # one loop, in a child process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    options = parse_arguments(argv)
    if options.side:
        print(json.dumps(measure(options.side, options)))
        return
    forwarded = [
        *("--preset", options.preset, "--steps", str(options.steps), "--warmup-steps", str(options.warmup_steps)),
        *("--batch-size", str(options.batch_size), "--workers", str(options.workers), "--images", str(options.images)),
        "--resolution",
        *map(str, options.resolution),
    ]
    runs = {"ours": [], "stock": []}
    for _ in range(options.rounds):
        for side in ("stock", "ours"):
            runs[side].append(in_fresh_process(side, forwarded))

    def median(side: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[side])

    import torch
    import transformers

    speed = {side: median(side, "images_per_second") for side in runs}
    memory = {side: median(side, "peak_rss_mb") for side in runs}
    workers = {side: median(side, "worker_peak_rss_mb") for side in runs}
    print(
        f"{options.preset}, batch {options.batch_size} at {options.resolution[1]} px (pre-crop "
        f"{options.resolution[0]}), {options.steps} steps ({options.warmup_steps} untimed), {options.workers} "
        f"workers, {options.images.name} images; medians of {options.rounds} rounds; {platform.machine()} "
        f"CPU, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print("| loop | images/s | peak RSS (training process) | largest worker | one-time decode |")
    print("|---|---|---|---|---|")
    decode = median("ours", "decode_seconds")
    print(
        f"| stock Trainer + stock BiT | {speed['stock']:.1f} | {memory['stock']:.0f} MB | {workers['stock']:.0f} MB | - |"
    )
    print(
        f"| bit-finetune | {speed['ours']:.1f} | {memory['ours']:.0f} MB | {workers['ours']:.0f} MB | {decode:.1f} s |"
    )
    print(
        f"ours / stock: {speed['ours'] / speed['stock']:.2f}x images/s (target >= 1.15), "
        f"peak memory {memory['ours'] / memory['stock']:.2f} (target <= 1)"
    )
    if options.json:
        options.json.write_text(
            json.dumps({"runs": runs, "images_per_second": speed, "peak_rss_mb": memory}, indent=2)
        )


if __name__ == "__main__":
    main()
