"""The README main job: `bit-finetune` with no data arguments.

Fine-tunes the package's embedded upstream checkpoint (`pretraining.embedded_checkpoint_path()`) on
scikit-learn's digits (1,797 real 8x8 handwritten digits shipped inside scikit-learn, upscaled by the
BiT processor) with BiT-HyperRule: 1, 5 and 10 examples per class (several random subsets each, as
the paper's few-shot protocol) and the full training set; then the same architecture from random
weights on the same subsets; and prints a table of accuracy, transfer vs. scratch.

Every (examples per class, arm) pair is one job of the fine-tuning engine (`finetune.engine`), its trials
the random subsets. The paper's rule (500 steps of 512 images at 128 px, per run) takes far longer than this
job's few minutes on two CPU cores, so by default a CPU-sized override is applied: fewer steps, a smaller
batch and the checkpoint's own pretraining resolution. It is printed above the table, field by field against
the paper's rule; `--paper-rule` runs the rule unmodified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_bit.folder_layout import folder_resolution

from .data import ImageClassificationData, from_images, median_image_area, split_off_validation
from .engine import FinetuneJob, FinetuneResult, run_finetuning_jobs, trial_summary, write_result_folder
from .errors import FinetuneInputError
from .hyperrule import FEW_SHOT_TRIALS, LEARNING_RATE, PAPER, SMALL_IMAGE_RESOLUTION, BitHyperRule
from .output_folder import check_output_dir
from .preprocessing import preprocess

logger = logging.getLogger("finetune")

FEW_SHOT_EXAMPLES_PER_CLASS = (1, 5, 10)
ARMS = ("transfer", "scratch")
# Held out from the 1,797 digits for evaluation (stratified): about 60 test images per class.
DIGITS_EVAL_FRACTION = 1 / 3
# The CPU-sized override (--paper-rule drops it). The crop is the checkpoint's pretraining resolution and
# the pre-crop keeps the rule's 160:128 ratio.
CPU_STEPS = 200
CPU_BATCH_SIZE = 64
# The rule's rate, not scaled down with the batch: with 8x fewer images per step, linear scaling would
# barely move in 200 steps.
CPU_LEARNING_RATE = LEARNING_RATE


@dataclasses.dataclass
class MainJobSettings:
    """What the command line sets for the main job (the CLI has checked that nothing else was given)."""

    checkpoint: str | None = None  # None: the embedded checkpoint
    rule_overrides: dict = dataclasses.field(default_factory=dict)  # the user's, on top of the CPU-sized override
    paper_rule: bool = False
    hyperrule: str = PAPER
    trials: int | None = None
    seed: int = 0
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    per_class_accuracy: bool = False
    num_workers: int = 0
    command: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class MainJobResult:
    accuracies: dict  # {row: {"transfer": [...], "scratch": [...]}}
    folder: Path | None  # the full-set transfer model, with --output-dir


def embedded_checkpoint() -> Path:
    """The small upstream checkpoint shipped in the package (`pretraining/embedded`), or a clear error."""
    try:
        from pretraining import embedded_checkpoint_path

        path = Path(embedded_checkpoint_path())
    except (ImportError, FileNotFoundError) as error:
        raise FinetuneInputError(
            "The main job fine-tunes the package's embedded upstream checkpoint "
            f"(pretraining.embedded_checkpoint_path()), which is not available: {error}. "
            "Pass --model FOLDER to run it with another checkpoint."
        ) from error
    return path


def load_digits() -> ImageClassificationData:
    """scikit-learn's digits as an image dataset (8-bit grayscale, 8x8), with a stratified test split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise FinetuneInputError(
            "The main job's data are scikit-learn's digits: pip install scikit-learn (or the [dev] extra)."
        ) from error
    from PIL import Image

    digits = sklearn_digits()
    pixels = np.round(digits.images * (255 / digits.images.max())).astype(np.uint8)  # 0..16 -> 0..255
    images = [Image.fromarray(image, mode="L") for image in pixels]
    label_names = [str(name) for name in digits.target_names]
    dataset = from_images(images, digits.target.tolist(), label_names)
    data = ImageClassificationData(dataset, dataset, label_names, {"name": "sklearn.datasets.load_digits"})
    return split_off_validation(data, DIGITS_EVAL_FRACTION, seed=0)


def main_job_overrides(checkpoint: Path, settings: MainJobSettings) -> dict:
    """The CPU-sized override, then anything the user overrode on top of it."""
    if settings.paper_rule:
        return dict(settings.rule_overrides)
    crop = folder_resolution(checkpoint) or SMALL_IMAGE_RESOLUTION[1]
    precrop = round(crop * SMALL_IMAGE_RESOLUTION[0] / SMALL_IMAGE_RESOLUTION[1])
    overrides = {
        "steps": CPU_STEPS,
        "batch_size": CPU_BATCH_SIZE,
        "learning_rate": CPU_LEARNING_RATE,
        "precrop": precrop,
        "crop": crop,
    }
    overrides.update(settings.rule_overrides)
    return overrides


def describe_override(rule: BitHyperRule, paper: BitHyperRule) -> str:
    """What differs from the paper's rule, field by field, and which learning rate is used and why."""
    differences = rule.differences_from(paper)
    differences.pop("micro_batch_size", None)
    if not differences:
        return (
            f"BiT-HyperRule as in the paper (--paper-rule): {rule.steps} steps of {rule.batch_size} images at "
            f"{rule.crop} px per run; on a CPU this takes hours."
        )
    changes = ", ".join(f"{name} {theirs} -> {mine}" for name, (mine, theirs) in differences.items())
    lines = [
        "CPU-sized override of BiT-HyperRule (the paper's value -> this run's; --paper-rule runs the rule unmodified):",
        f"  {changes}",
    ]
    if rule.batch_size != paper.batch_size and "learning_rate" not in differences:
        fewer = (paper.steps * paper.batch_size) / (rule.steps * rule.batch_size)
        lines.append(
            f"  learning rate {rule.learning_rate:g}: the rule's, not scaled to the batch ({paper.learning_rate:g} x "
            f"{rule.batch_size}/{paper.batch_size}); linear scaling keeps the number of examples seen, and this run "
            f"sees {fewer:.0f}x fewer ({rule.steps} x {rule.batch_size} vs {paper.steps} x {paper.batch_size})."
        )
    elif "learning_rate" in differences:
        lines.append(f"  learning rate {rule.learning_rate_reason}")
    return "\n".join(lines)


def format_accuracy(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}%"
    summary = trial_summary(values)
    return f"{100 * summary['eval_accuracy']:.1f}% ({100 * summary['eval_accuracy_min']:.1f}-{100 * summary['eval_accuracy_max']:.1f})"


def format_table(rows: list[tuple[str, list[float], list[float]]], checkpoint_name: str) -> str:
    lines = [
        f"| examples per class | transfer ({checkpoint_name}) | from scratch | transfer - scratch |",
        "|---|---|---|---|",
    ]
    for name, transfer, scratch in rows:
        gain = 100 * (float(np.median(transfer)) - float(np.median(scratch)))
        lines.append(f"| {name} | {format_accuracy(transfer)} | {format_accuracy(scratch)} | {gain:+.1f} points |")
    return "\n".join(lines)


@contextlib.contextmanager
def one_intra_op_thread():
    """One intra-op thread for the job, the previous setting restored after it.

    The main job's network is tiny (bit-tiny at 48 px): splitting its convolutions across threads costs more
    synchronisation than it saves; the cores run independent trials instead (`run_finetuning_jobs`).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_main_job(settings: MainJobSettings) -> MainJobResult:
    """Transfer vs. scratch on digits; prints the table, returns the accuracies (and the saved folder)."""
    if settings.output_dir is not None:
        check_output_dir(settings.output_dir, resume=False, overwrite=settings.overwrite_output_dir, signature={})
    checkpoint = Path(settings.checkpoint) if settings.checkpoint else embedded_checkpoint()
    with one_intra_op_thread():
        return _run_main_job(checkpoint, settings)


def _run_main_job(checkpoint: Path, settings: MainJobSettings) -> MainJobResult:
    started = time.perf_counter()
    trials = settings.trials or FEW_SHOT_TRIALS
    data = load_digits()
    area, _ = median_image_area(data.train)
    overrides = main_job_overrides(checkpoint, settings)
    paper_rule = BitHyperRule.from_dataset(len(data.train), area, variant=settings.hyperrule)
    full_rule = BitHyperRule.from_dataset(len(data.train), area, variant=settings.hyperrule, **overrides)
    side = round(area**0.5)
    logger.info(
        "Main job: BiT-HyperRule fine-tuning of %s on scikit-learn's digits (%d classes, %d training / %d test "
        "images of %dx%d px), against the same network from random weights.",
        checkpoint,
        data.num_classes,
        len(data.train),
        len(data.eval),
        side,
        side,
    )
    for announcement in data.announcements:
        logger.info(announcement)
    logger.info(describe_override(full_rule, paper_rule))

    # Decoded and resized once for all runs; every trial crops and flips its own subset.
    workers = settings.num_workers
    train_images = preprocess(data.train, full_rule.precrop, num_workers=workers, description="Resizing the digits")
    eval_images = preprocess(data.eval, full_rule.crop, num_workers=workers, description="Resizing the test digits")
    digits = dataclasses.replace(data, train=train_images, eval=eval_images, announcements=[])
    rows = [(str(k), k, trials) for k in FEW_SHOT_EXAMPLES_PER_CLASS] + [(f"all ({len(train_images):,})", None, 1)]
    with tempfile.TemporaryDirectory(prefix="bit-finetune-main-job-") as work_root:
        jobs = {
            (name, arm): FinetuneJob(
                model=str(checkpoint),
                data=digits,
                from_scratch=arm == "scratch",
                hyperrule=settings.hyperrule,
                rule_overrides=overrides,
                median_image_area=area,
                examples_per_class=examples_per_class,
                trials=row_trials,
                seed=settings.seed,
                work_dir=Path(work_root) / f"{arm}-{examples_per_class or 'all'}",
                training={"dataloader_num_workers": 0},
                save_checkpoints=False,
                per_class_accuracy=settings.per_class_accuracy,
                quiet=True,
                command=list(settings.command),
            )
            for name, examples_per_class, row_trials in rows
            for arm in ARMS
        }
        total_runs = sum(job.trials for job in jobs.values())
        with tqdm(total=total_runs, desc="Fine-tuning runs", unit="run") as progress:

            def trial_done(job: FinetuneJob, trial: int, accuracy: float) -> None:
                progress.update()
                shots = f"{job.examples_per_class} per class" if job.examples_per_class else "all examples"
                arm = "scratch" if job.from_scratch else "transfer"
                progress.set_postfix_str(f"{arm}, {shots}: {accuracy:.3f}")

            results: dict[tuple[str, str], FinetuneResult] = dict(
                zip(jobs, run_finetuning_jobs(list(jobs.values()), on_trial_end=trial_done))
            )
        accuracies = {name: {arm: results[name, arm].accuracies for arm in ARMS} for name, _, _ in rows}

        logger.info("")
        logger.info(describe_override(full_rule, paper_rule))
        logger.info(
            "Top-1 accuracy on %d held-out digits; few-shot rows: median of %d random subsets (min-max).",
            len(eval_images),
            trials,
        )
        arm_name = "embedded checkpoint" if settings.checkpoint is None else checkpoint.name
        logger.info(
            format_table(
                [(name, accuracies[name]["transfer"], accuracies[name]["scratch"]) for name, _, _ in rows], arm_name
            )
        )
        logger.info("%d runs in %.0f s.", total_runs, time.perf_counter() - started)
        folder = None
        if settings.output_dir is not None:
            full_set = rows[-1][0]
            folder = write_result_folder(
                jobs[full_set, "transfer"],
                results[full_set, "transfer"],
                settings.output_dir,
                extra_results={"main_job": accuracies},
            )
            logger.info("Saved the full-set fine-tuned model in %s", folder)
    return MainJobResult(accuracies, folder)
