"""Pre-train a BiT network upstream with the paper's recipe (§3.3, docs/recipe.md), from one CPU to many GPUs.

    python pretraining/pretrain.py --model-preset bit-tiny --train-dir D --output-dir O --max-steps 100
    torchrun --nproc_per_node 2 pretraining/pretrain.py ...        (also: bit-pretrain, python -m pretraining.pretrain)
    accelerate launch --multi_gpu --num_processes 2 pretraining/pretrain.py ...
    accelerate launch --config_file pretraining/configs/multi_gpu.yaml pretraining/pretrain.py ...

`train` is the recipe's loop: each optimizer step takes its learning rate from the schedule (linear warmup,
staircase decays), accumulates micro-batches up to the global batch and updates with SGD and momentum;
every --logging-steps it logs, every --probe-every it probes the representation on held-out images, every
--checkpoint-every it saves a checkpoint to resume from exactly, and at the end it writes O/final. What it
stands on: `arguments` (flags), `data` (batches), `heldout` (the probe), `checkpoints` (saving, exact
resume), `reporting` (the log), `launching` (launchers, stopping, messages), `outputs` (the output folder).

Run by path, this script imports the installed `pretraining` package (`pip install -e .` in the repository).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

try:  # the project's packages, installed with `pip install -e .` (see the docstring)
    from image_data import InputError
    from pretraining import data as upstream_data
except ModuleNotFoundError as missing:
    if missing.name not in ("image_data", "pretraining", "modeling_bit", "model_cards"):
        raise
    raise SystemExit(
        f"pretrain.py: cannot import {missing.name!r}: install bit-transfer (pip install -e . in the repository, "
        "again after an update that adds a package), or put the repository on PYTHONPATH."
    ) from None
from modeling_bit.folder_layout import PRETRAINING_LOG_FILE, PROBE_RESULTS_FILE
from pretraining.arguments import make_recipe, parse_arguments, validate_arguments
from pretraining.checkpoints import (
    Resume,
    completed_checkpoints,
    exactness_signature,
    resolve_checkpoint,
    run_signature,
    save_checkpoint,
)
from pretraining.heldout import FewShotProbe, HeldOutSet
from pretraining.launching import (
    Stopped,
    StopRequests,
    agree_on_step,
    one_message_and_a_clean_exit,
    resume_command,
    start_accelerator,
)
from pretraining.outputs import (
    TRACKER_PROJECT,
    delete_checkpoints,
    prepare_output_dir,
    pretraining_record,
    save_final,
)
from pretraining.recipe import schedule_for_run
from pretraining.reporting import (
    RunUnreadableImages,
    Throughput,
    announcement,
    append_training_log,
    log_entry,
    progress_postfix,
    resume_training_log,
)
from pretraining.training import build_model, upstream_loss


@dataclasses.dataclass
class PretrainingResult:
    final: Path  # O/final
    model: torch.nn.Module  # as prepared by accelerate (DDP/FSDP wrapped); `accelerator.unwrap_model` it
    accelerator: Accelerator


def main(argv: list[str] | None = None) -> Path:
    with one_message_and_a_clean_exit(lambda: after_an_interrupt(argv)):
        result = train(argv)
    result.accelerator.end_training()  # finish the trackers, then leave the process group cleanly
    return result.final


def train(argv: list[str] | None = None, on_batch=None) -> PretrainingResult:
    """Run a pre-training job from command-line arguments.

    `on_batch(step, batch)`, if given, sees every micro-batch of this process before it is trained on (for
    inspecting the data stream; the script itself passes nothing). The caller ends the run with
    `result.accelerator.end_training()` (trackers, process group), as `main` does.
    """
    arguments = parse_arguments(argv)
    validate_arguments(arguments)
    model_args, data_args, recipe_args, run_args = arguments.model, arguments.data, arguments.recipe, arguments.run
    output_dir = Path(run_args.output_dir)
    foreign_checkpoints = prepare_output_dir(
        output_dir, run_args.resume_from_checkpoint, run_args.overwrite_output_dir
    )
    recipe = make_recipe(arguments)
    accelerator, accumulation, trackers = start_accelerator(
        model_args.mixed_precision,
        recipe.global_batch_size,
        recipe_args.per_device_batch_size,
        run_args.report_to,
        output_dir,
    )
    processes = accelerator.num_processes
    set_seed(run_args.seed)
    delete_checkpoints(accelerator, output_dir, foreign_checkpoints)
    requested = run_args.resume_from_checkpoint
    checkpoint = resolve_checkpoint(output_dir, requested) if requested else None
    if requested == "latest" and checkpoint is None:
        accelerator.print(f"No checkpoint in {output_dir} yet: starting from step 0.")

    with accelerator.main_process_first():
        source = upstream_data.load_for_run(data_args, model_args.multi_label, run_args.seed)
    length_given = recipe_args.max_steps is not None or recipe_args.epochs is not None
    warmup_given = recipe_args.warmup_steps is not None
    run = schedule_for_run(
        recipe, source.num_train_examples, recipe_args.max_steps, warmup_given=warmup_given, length_given=length_given
    )
    recipe, schedule = run.recipe, run.schedule
    accelerator.print(
        announcement(
            model_args.model_preset,
            run,
            source,
            recipe_args.per_device_batch_size,
            processes,
            accumulation,
            recipe_args.max_steps,
        )
    )
    signature = run_signature(
        arguments, recipe, schedule.total_steps, schedule.decay_steps, source, processes, accumulation
    )
    exactness = exactness_signature(arguments, accelerator)
    resume = Resume.check(checkpoint, signature, exactness, accelerator.print)

    model = build_model(
        model_args.model_preset,
        source.labels,
        recipe.multi_label_head_bias,
        gradient_checkpointing=model_args.gradient_checkpointing,
        channels_last=model_args.channels_last,
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=schedule.learning_rate(0), momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if trackers:
        accelerator.init_trackers(TRACKER_PROJECT, config={**recipe.to_dict(), "total_steps": schedule.total_steps})
    start_step = resume.step
    stream_positions, unreadable_so_far = resume.restore(accelerator, source.streaming)  # per DataLoader worker
    unreadable = RunUnreadableImages(unreadable_so_far)

    loader = upstream_data.build_train_loader(
        source,
        upstream_data.BatchBuilder.for_recipe(source, recipe, run_args.seed, train=True),
        accelerator,
        seed=run_args.seed,
        per_device_batch_size=recipe_args.per_device_batch_size,
        accumulation=accumulation,
        start_step=start_step,
        total_steps=schedule.total_steps,
        num_workers=data_args.dataloader_num_workers,
        shuffle_buffer_size=data_args.shuffle_buffer_size,
        stream_positions=stream_positions,
    )
    held_out = HeldOutSet(
        source,
        upstream_data.BatchBuilder.for_recipe(source, recipe, run_args.seed, train=False),
        accelerator,
        run_args.probe_examples_per_class,
        run_args.probe_classes,
        recipe_args.per_device_batch_size,
        scan_limit=max(data_args.validation_examples, 1),
    )
    log_path = output_dir / PRETRAINING_LOG_FILE
    last_loss = resume_training_log(log_path, start_step) if accelerator.is_main_process else float("nan")
    probe = FewShotProbe(held_out, accelerator, run_args.seed, output_dir / PROBE_RESULTS_FILE, start_step)
    accelerator.print(probe.describe())

    def progress_state(step: int) -> dict:
        """What progress.json records (every process takes part)."""
        state = {
            "step": step,
            **signature,
            "exactness": exactness,
            "unreadable_images": unreadable.record(accelerator),
        }
        if source.streaming:
            state["stream_positions"] = gather_object([stream_positions])
        return state

    def checkpoint_here(step: int):
        return save_checkpoint(accelerator, output_dir, step, progress_state(step), run_args.keep_checkpoints)

    def continue_with() -> str:
        return resume_command(_command_arguments(argv), processes, accelerator.distributed_type.value)

    # --- the loop: one optimizer step per iteration ------------------------------------------------------------
    model.train()
    progress_bar = tqdm(
        total=schedule.total_steps,
        initial=start_step,
        desc="pretraining",
        unit="step",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    throughput, steps_since_log = Throughput(), 0
    loss_sum = torch.zeros((), device=accelerator.device)
    batches = iter(loader)
    # Closing the batches ends the DataLoader workers with the loop, also when it raises.
    ending = contextlib.closing(batches) if hasattr(batches, "close") else contextlib.nullcontext()
    with StopRequests() as stop, ending, progress_bar:
        for step in range(start_step, schedule.total_steps):
            learning_rate = schedule.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            readable, unreadable_here = 0, []
            for _ in range(accumulation):
                waiting_since = time.perf_counter()
                try:
                    batch = next(batches)
                except RuntimeError:  # a DataLoader worker killed by the SIGTERM a launcher sends its process group
                    if stop.received is None:
                        raise
                    checkpoint = (
                        checkpoint_here(step) if step > start_step else resolve_checkpoint(output_dir, "latest")
                    )
                    raise Stopped(stop.received, step, schedule.total_steps, checkpoint, continue_with()) from None
                throughput.add_data_wait(time.perf_counter() - waiting_since)
                if source.streaming:
                    position = batch.pop("stream_position")
                    stream_positions[position["worker"]] = position
                if on_batch is not None:
                    on_batch(step, batch)
                unreadable_here += batch["unreadable"]
                readable += len(batch["weights"]) - len(batch["unreadable"])
                pixel_values = batch["pixel_values"]
                if model_args.channels_last:
                    pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
                with accelerator.accumulate(model):
                    logits = model(pixel_values=pixel_values).logits
                    loss = upstream_loss(logits, batch["labels"], batch["weights"], source.labels.multi_label)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach() / accumulation
            unreadable.add(unreadable_here)
            readable, stop_now = agree_on_step(accelerator, readable, stop.received is not None)
            if readable == 0:
                examples = f" (e.g. {', '.join(unreadable_here[:3])})" if unreadable_here else ""
                raise InputError(
                    f"None of the images of step {step + 1} could be read{examples}: expected image files or encoded "
                    "images in the image column. Check --image-column and the data."
                )
            throughput.add_step(recipe.global_batch_size)
            steps_since_log += 1
            done = step + 1
            progress_bar.update(1)

            metrics = {}
            probe_now = (run_args.probe_every and done % run_args.probe_every == 0) or done == schedule.total_steps
            if done % run_args.logging_steps == 0 or probe_now:
                last_loss = accelerator.reduce(loss_sum, reduction="mean").item() / steps_since_log
                epoch = (
                    done * recipe.global_batch_size / source.num_train_examples if source.num_train_examples else None
                )
                unreadable_count = len(unreadable.synchronise(accelerator))
                metrics = log_entry(
                    done,
                    last_loss,
                    learning_rate,
                    throughput,
                    processes,
                    schedule.total_steps,
                    epoch,
                    unreadable_count,
                )
                loss_sum.zero_()
                steps_since_log = 0
            if probe_now:
                metrics.update(probe(model, done, source.labels.multi_label))
            if metrics:
                if accelerator.is_main_process:
                    append_training_log(log_path, metrics)
                    progress_bar.set_postfix(progress_postfix(metrics, learning_rate), refresh=False)
                if trackers:
                    accelerator.log({k: v for k, v in metrics.items() if k != "step" and v is not None}, step=done)
            if done % run_args.checkpoint_every == 0 or done == schedule.total_steps or stop_now:
                checkpoint = checkpoint_here(done)
            if stop_now and done < schedule.total_steps:
                raise Stopped(stop.received or signal.SIGTERM, done, schedule.total_steps, checkpoint, continue_with())

    # Called from Python with `argv`, the process's own sys.argv is the caller's (e.g. pytest's), not this job's.
    command = list(sys.argv) if argv is None else ["pretraining/pretrain.py", *argv]
    unreadable_record = unreadable.record(accelerator)  # every process takes part
    record = pretraining_record(
        command, run, source, last_loss, accelerator, unreadable_record, exactness, recipe_args.max_steps
    )
    final = save_final(accelerator, model, output_dir, recipe.image_size, record, probe.results)
    return PretrainingResult(final, model, accelerator)


def _command_arguments(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:]) if argv is None else list(argv)


def after_an_interrupt(argv: list[str] | None) -> str:
    """Where an interrupted run stands (its newest checkpoint) and the command that continues it."""
    output_dir = Path(parse_arguments(argv).run.output_dir)
    checkpoints = completed_checkpoints(output_dir)
    if not checkpoints:
        return "No checkpoint was saved: running the command again starts from step 0."
    processes = PartialState().num_processes if PartialState._shared_state else 1
    step, newest = checkpoints[-1]
    continue_with = resume_command(_command_arguments(argv), processes)
    return f"The newest checkpoint is {newest} (step {step}). Continue with:\n  {continue_with}"


if __name__ == "__main__":
    main()
