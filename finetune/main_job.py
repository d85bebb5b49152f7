"""The README main job: `bit-finetune` with no data arguments.

Fine-tunes the package's embedded upstream checkpoint (`pretraining.embedded_checkpoint_path()`) on
scikit-learn's digits (1,797 real 8x8 handwritten digits shipped inside scikit-learn, upscaled by the
BiT processor) with BiT-HyperRule: 1, 5 and 10 examples per class (several random subsets each, as
the paper's few-shot protocol) and the full training set; then the same architecture from random
weights on the same subsets; and prints a table of accuracy, transfer vs. scratch.

The paper's rule (500 steps of 512 images at 128 px, per run) takes far longer than this job's five
minutes on two CPU cores, so by default a CPU-sized override is applied: fewer steps, a smaller batch
and the checkpoint's own pretraining resolution. It is printed above the table, field by field
against the paper's rule; `--paper-rule` runs the rule unmodified.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from . import data as data_module
from .cli import check_output_dir, given_flags
from .errors import FinetuneInputError
from .finetuning import push_to_hub, train_and_evaluate, training_inputs, trial_summary, write_output_folder
from .hyperrule import (
    FEW_SHOT_TRIALS,
    LEARNING_RATE,
    SMALL_IMAGE_RESOLUTION,
    BitHyperRule,
    choose_micro_batch_size,
)
from .models import load_model_for_labels
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
MAIN_JOB_THREADS = 1


def embedded_checkpoint() -> Path:
    """The small upstream checkpoint shipped in the package (pretraining issue), or a clear error."""
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


# Keys of an image processor's `size`, in the order their value is taken as the square side (BiT's own
# processor saves height/width; other processors save a shortest or longest edge).
SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge")


def checkpoint_resolution(folder: Path) -> int | None:
    """The square resolution the checkpoint's saved preprocessor resizes to, if it says one (any of the
    `size` forms of transformers' image processors); None (the rule's resolution is used) otherwise."""
    try:
        size = json.loads((folder / "preprocessor_config.json").read_text())["size"]
    except (OSError, KeyError, ValueError, TypeError):
        return None
    if isinstance(size, dict):
        size = next((size[key] for key in SIZE_KEYS if isinstance(size.get(key), int)), None)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    logger.info("%s: no square size in preprocessor_config.json; using the rule's resolution.", folder)
    return None


def load_digits() -> data_module.ImageClassificationData:
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
    dataset = data_module.from_images(images, digits.target.tolist(), label_names)
    data = data_module.ImageClassificationData(dataset, dataset, label_names, {"name": "sklearn.datasets.load_digits"})
    return data_module.split_off_validation(data, DIGITS_EVAL_FRACTION, seed=0)


def main_job_overrides(checkpoint: Path, rule_args) -> dict:
    """The CPU-sized override, then anything the user overrode on top of it."""
    if rule_args.paper_rule:
        return rule_args.overrides()
    crop = checkpoint_resolution(checkpoint) or SMALL_IMAGE_RESOLUTION[1]
    precrop = round(crop * SMALL_IMAGE_RESOLUTION[0] / SMALL_IMAGE_RESOLUTION[1])
    overrides = {
        "steps": CPU_STEPS,
        "batch_size": CPU_BATCH_SIZE,
        "learning_rate": CPU_LEARNING_RATE,
        "precrop": precrop,
        "crop": crop,
    }
    overrides.update(rule_args.overrides())
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


def check_main_job_arguments(model_args, data_args, rule_args, run_args) -> None:
    """Refuse the flags the main job has no use for (rather than ignore them), and bad combinations."""
    unused = [
        *given_flags(model_args, ("from_scratch",)),
        *given_flags(
            data_args,
            (
                "validation_dir",
                "dataset_config",
                "image_column",
                "label_column",
                "train_split",
                "validation_split",
                "streaming",
                "validation_fraction",
                "examples_per_class",
            ),
        ),
        *given_flags(rule_args, ("bit_l_resolution",)),  # the digits are small images: 128 px by the rule
        *given_flags(run_args, ("resume", "save_steps")),  # the job keeps no checkpoints
    ]
    if unused:
        raise FinetuneInputError(
            f"{', '.join(unused)}: not used by the main job (it runs when no --train-dir or --dataset is given)."
        )
    if data_args.trials is not None and data_args.trials < 1:
        raise FinetuneInputError(f"--trials {data_args.trials}: expected at least 1.")
    if rule_args.paper_rule and rule_args.overrides():
        raise FinetuneInputError(
            f"--paper-rule runs the rule unmodified, but these are overridden: {sorted(rule_args.overrides())}."
        )
    if run_args.push_to_hub and run_args.output_dir is None:
        raise FinetuneInputError("--push-to-hub needs --output-dir to save the main job's full-set model first.")
    if run_args.hub_model_id is not None and not run_args.push_to_hub:
        raise FinetuneInputError("--hub-model-id goes with --push-to-hub.")
    if run_args.overwrite_output_dir and run_args.output_dir is None:
        raise FinetuneInputError("--overwrite-output-dir goes with --output-dir.")
    if run_args.output_dir is not None:
        check_output_dir(Path(run_args.output_dir), run_args, run_record={})


@contextlib.contextmanager
def main_job_environment():
    """One intra-op thread, quiet transformers and no per-run head message (every transfer run replaces the
    head) for the job; the previous settings restored after it.

    The main job's network is tiny (bit-tiny at 48 px): splitting its convolutions across threads costs
    more synchronisation than it saves, and with anything else running on a 2-core machine two spinning
    OpenMP threads made the same runs 3-9x slower than one thread (measured).
    """
    threads = torch.get_num_threads()
    models_logger = logging.getLogger(load_model_for_labels.__module__)
    models_level = models_logger.level
    verbosity = transformers_logging.get_verbosity()
    progress_bars = transformers_logging.is_progress_bar_enabled()
    torch.set_num_threads(MAIN_JOB_THREADS)
    transformers_logging.set_verbosity_error()  # the expected head replacement would be reported every run
    transformers_logging.disable_progress_bar()
    models_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        models_logger.setLevel(models_level)
        transformers_logging.set_verbosity(verbosity)
        if progress_bars:
            transformers_logging.enable_progress_bar()


def load_arm(checkpoint: Path, arm: str, label_names: list[str], seed: int) -> torch.nn.Module:
    """The checkpoint with a zero head ("transfer"), or its architecture from seeded random weights ("scratch")."""
    return load_model_for_labels(checkpoint, label_names, from_scratch=arm == "scratch", seed=seed)


def fine_tune(model, rule, subset, eval_images, label_names, *, seed, output_dir, per_class_accuracy):
    """One run of the job: in-memory digits, no checkpoints, no progress bars (the job has its own)."""
    stream, _ = training_inputs(subset, rule, seed=seed, num_workers=0)
    return train_and_evaluate(
        model,
        rule,
        stream,
        eval_images,
        label_names,
        output_dir=output_dir,
        seed=seed,
        save_checkpoints=False,
        quiet=True,
        per_class_accuracy=per_class_accuracy,
    )


def run_main_job(model_args, data_args, rule_args, run_args, argv) -> dict:
    """Transfer vs. scratch on digits; prints the table and returns {row: {"transfer": [...], "scratch": [...]}}."""
    check_main_job_arguments(model_args, data_args, rule_args, run_args)
    checkpoint = Path(model_args.model) if model_args.model else embedded_checkpoint()
    with main_job_environment():
        return _run_main_job(checkpoint, model_args, data_args, rule_args, run_args, argv)


def _run_main_job(checkpoint: Path, model_args, data_args, rule_args, run_args, argv) -> dict:
    started = time.perf_counter()
    trials = data_args.trials or FEW_SHOT_TRIALS

    data = load_digits()
    area, _ = data_module.median_image_area(data.train)
    overrides = main_job_overrides(checkpoint, rule_args)
    paper_rule = BitHyperRule.from_dataset(len(data.train), area)
    full_rule = BitHyperRule.from_dataset(len(data.train), area, **overrides)
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

    workers = run_args.num_workers
    train_images = preprocess(data.train, full_rule.precrop, num_workers=workers, description="Resizing the digits")
    eval_images = preprocess(data.eval, full_rule.crop, num_workers=workers, description="Resizing the test digits")
    train_labels = train_images.labels.numpy()
    rows = [(str(k), k, trials) for k in FEW_SHOT_EXAMPLES_PER_CLASS] + [(f"all ({len(train_images):,})", None, 1)]
    results = {name: {arm: [] for arm in ARMS} for name, _, _ in rows}
    micro_batch_size = overrides.get("micro_batch_size")
    kept_model = None
    total_runs = len(ARMS) * sum(row_trials for _, _, row_trials in rows)
    with (
        tempfile.TemporaryDirectory(prefix="bit-finetune-main-job-") as work_dir,
        tqdm(total=total_runs, desc="Fine-tuning runs", unit="run") as progress,
    ):
        for name, examples_per_class, row_trials in rows:
            for trial in range(row_trials):
                seed = run_args.seed + trial
                subset = train_images
                if examples_per_class is not None:
                    subset = train_images.select(
                        data_module.few_shot_indices(train_labels, examples_per_class, seed, data.label_names)
                    )
                for arm in ARMS:
                    model = load_arm(checkpoint, arm, data.label_names, seed)
                    if micro_batch_size is None:
                        device = PartialState().device
                        micro_batch_size = choose_micro_batch_size(model, full_rule.crop, full_rule.batch_size, device)
                    rule = BitHyperRule.from_dataset(len(subset), area, **overrides)
                    rule = rule.with_micro_batch_size(micro_batch_size)
                    trainer, result = fine_tune(
                        model,
                        rule,
                        subset,
                        eval_images,
                        data.label_names,
                        seed=seed,
                        output_dir=Path(work_dir) / f"{arm}-{name}-{trial}",
                        per_class_accuracy=run_args.per_class_accuracy,
                    )
                    results[name][arm].append(result.accuracy)
                    if arm == "transfer" and examples_per_class is None and run_args.output_dir is not None:
                        # save_model writes on the main process only
                        trainer.save_model(str(Path(work_dir) / "full-set-model"))
                        kept_model = (rule, result)
                    progress.update()
                    per_class = f"{name} per class" if examples_per_class else "all examples"
                    progress.set_postfix_str(f"{arm}, {per_class}: {result.accuracy:.3f}")

        logger.info("")
        logger.info(describe_override(full_rule, paper_rule))
        logger.info(
            "Top-1 accuracy on %d held-out digits; few-shot rows: median of %d random subsets (min-max).",
            len(eval_images),
            trials,
        )
        arm_name = "embedded checkpoint" if model_args.model is None else checkpoint.name
        logger.info(
            format_table(
                [(name, results[name]["transfer"], results[name]["scratch"]) for name, _, _ in rows], arm_name
            )
        )
        logger.info("%d runs in %.0f s.", total_runs, time.perf_counter() - started)
        if kept_model is not None and PartialState().is_main_process:
            rule, result = kept_model
            save_main_job_folder(
                run_args.output_dir, Path(work_dir) / "full-set-model", rule, result, results, argv, checkpoint, data
            )
    if run_args.push_to_hub and PartialState().is_main_process:
        logger.info("Uploaded to %s", push_to_hub(run_args.output_dir, run_args.hub_model_id))
    return results


def save_main_job_folder(output_dir, model_dir, rule, result, results, argv, checkpoint, data) -> None:
    eval_results = dict(result.eval_metrics)
    all_results = {**result.train_metrics, **eval_results, "main_job": results}
    finetune_args = {
        "command": ["bit-finetune", *argv],
        "model": str(checkpoint),
        "model_is_local_folder": True,  # the embedded checkpoint
        "dataset": {
            **data.source,
            "num_train_examples": result.num_train_examples,
            "num_eval_examples": result.num_eval_examples,
            "num_classes": data.num_classes,
            "examples_per_class": None,
            "trials": 1,
        },
    }
    write_output_folder(
        output_dir,
        model_dir,
        rule,
        eval_results=eval_results,
        all_results=all_results,
        finetune_args=finetune_args,
        log_history=result.log_history,
    )
    logger.info("Saved the full-set fine-tuned model in %s", output_dir)
