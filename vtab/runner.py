"""The VTAB-1k runner: every task through the fine-tuning engine, one BiT-HyperRule setting for all.

`run_vtab(settings)`:

1. checks the output folder `O` (a run there is continued only with `--resume`, and only with the same settings;
   `--overwrite-output-dir` starts over);
2. prepares every task's examples (`vtab.data.prepare_task`, into `O/data/<task>/`) before any training, so an
   unknown or unreachable source, a task with fewer than 1,000 training examples or bad labels stops the run before
   it starts; unreadable images are skipped and counted;
3. fine-tunes each task not finished yet with `finetune.engine.run_finetuning` into `O/tasks/<task>/` (the rule
   from the task's data, the task's Appendix B flip/crop switches as part of the rule, the user's overrides, `--trials` runs
   reported by their median), resuming an interrupted task from its checkpoint;
4. records each finished task in `O/vtab_results.json` as soon as it finishes, then writes the table, the bar chart
   and the run's model card (`vtab.results`, `vtab.card`).

A finished task is never rerun: its folder and its entry in the results are kept, and a rerun reads them back.
Under `torchrun` / `accelerate launch` the main process prepares the data and writes the records; every process
trains (the engine splits the batch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback

from finetune.distributed import process_state
from finetune.engine import RESUMABLE_TRAINING_SETTINGS, FinetuneJob, FinetuneResult, run_finetuning
from finetune.errors import FinetuneInputError
from finetune.hyperrule import PAPER
from finetune.output_folder import RUN_FILE_NAME, is_finished_folder, work_dir_of
from modeling_bit.file_utils import atomic_write_json
from modeling_bit.folder_layout import ALL_RESULTS_FILE, EVAL_RESULTS_FILE, FINETUNE_ARGS_FILE, MODEL_CARD_FILE

from .card import build_card, write_card
from .data import FINAL, PreparedTask, load_prepared, prepare_task
from .registry import VtabTask
from .results import PLOT_FILE, RESULTS_FILE, TaskResult, VtabResults, results_table, save_accuracy_plot

logger = logging.getLogger(__name__)

RUN_FILE = "vtab_run.json"
DATA_DIR, TASKS_DIR = "data", "tasks"
# What bit-vtab writes into O (besides the data cache, which --overwrite-output-dir keeps: it is a copy of the
# sources, reused when a task's definition is unchanged).
RUN_OUTPUTS = (RUN_FILE, RESULTS_FILE, PLOT_FILE, MODEL_CARD_FILE, TASKS_DIR)


@dataclasses.dataclass
class VtabSettings:
    """One bit-vtab run: the model, the tasks, and the fine-tuning settings every task shares (`FinetuneJob`'s)."""

    model: str
    output_dir: Path
    tasks: list[VtabTask]
    from_scratch: bool = False
    hyperrule: str = PAPER
    large_resolution: tuple[int, int] | None = None
    rule_overrides: dict = dataclasses.field(default_factory=dict)
    gradient_accumulation_steps: int | None = None
    training: dict = dataclasses.field(default_factory=dict)
    trials: int = 1
    seed: int = 0
    protocol: str = FINAL
    resume: bool = False
    overwrite_output_dir: bool = False
    per_class_accuracy: bool = False
    command: list[str] = dataclasses.field(default_factory=list)

    def signature(self) -> dict:
        """What fixes the run's results (everything but the task list): a `--resume` must match it."""

        def plain(value):
            if isinstance(value, tuple):
                return list(value)
            return value if isinstance(value, (bool, int, float, str, list, dict, type(None))) else str(value)

        return {
            "model": str(self.model),
            "from_scratch": self.from_scratch,
            "hyperrule": self.hyperrule,
            "large_resolution": plain(self.large_resolution),
            "rule_overrides": {name: plain(value) for name, value in sorted(self.rule_overrides.items())},
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "training": {
                name: plain(value)
                for name, value in sorted(self.training.items())
                if name not in RESUMABLE_TRAINING_SETTINGS
            },
            "trials": self.trials,
            "seed": self.seed,
            "protocol": self.protocol,
            "per_class_accuracy": self.per_class_accuracy,
        }


# --- The output folder ----------------------------------------------------------------------------------------


def check_output_dir(settings: VtabSettings) -> dict:
    """The earlier run's record to continue ({} for a new run); refuses a folder that cannot be used as asked.
    Reads only."""
    output_dir = settings.output_dir
    nearest = next(path for path in (output_dir, *output_dir.absolute().parents) if path.exists())
    if not nearest.is_dir():
        raise FinetuneInputError(f"--output-dir {output_dir}: {nearest} is a file; expected a folder (new or empty).")
    run_file = output_dir / RUN_FILE
    if run_file.is_file() and not settings.overwrite_output_dir:
        if not settings.resume:
            raise FinetuneInputError(
                f"{output_dir} holds a bit-vtab run; pass --resume to continue it (finished tasks are kept), or "
                "--overwrite-output-dir to start over."
            )
        try:
            previous = json.loads(run_file.read_text())
            recorded = previous["settings"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FinetuneInputError(
                f"{run_file} is not readable ({error}); pass --overwrite-output-dir to start over."
            ) from error
        signature = json.loads(json.dumps(settings.signature()))
        changed = sorted(key for key in set(recorded) | set(signature) if recorded.get(key) != signature.get(key))
        if changed:
            raise FinetuneInputError(
                f"--resume continues the run in {output_dir} with its own settings, but these differ: "
                + ", ".join(f"{key} (was {recorded.get(key)!r}, now {signature.get(key)!r})" for key in changed)
                + ". Use another --output-dir, or --overwrite-output-dir to start over."
            )
        for task in settings.tasks:
            before = previous.get("tasks", {}).get(task.name)
            if before is not None and before != json.loads(json.dumps(task.to_dict())):
                raise FinetuneInputError(
                    f"--resume: task {task.name} is defined differently from when it ran in {output_dir}; use another "
                    "--output-dir, or --overwrite-output-dir to start over."
                )
        return previous
    if output_dir.is_dir() and not settings.overwrite_output_dir:
        foreign = sorted(path.name for path in output_dir.iterdir() if path.name != DATA_DIR)
        if foreign:
            raise FinetuneInputError(
                f"{output_dir} exists and is not empty ({', '.join(foreign[:5])}); pass --overwrite-output-dir to "
                "replace what bit-vtab writes there, or choose another --output-dir."
            )
    return {}


def _clear_run_outputs(output_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# --- Preparing the data -----------------------------------------------------------------------------------------


def prepare_tasks(settings: VtabSettings) -> dict[str, PreparedTask]:
    """Every task's examples, read by the main process before any training (failures stop the whole run here);
    the other processes then open what it wrote."""
    state = process_state()
    data_dir = settings.output_dir / DATA_DIR
    error = None
    prepared: dict[str, PreparedTask] = {}
    if state.is_main_process:
        try:
            for number, task in enumerate(settings.tasks, start=1):
                logger.info("Preparing task %d of %d: %s (%s).", number, len(settings.tasks), task.name, task.group)
                prepared[task.name] = prepare_task(task, data_dir / task.folder_name)
                if prepared[task.name].num_unreadable:
                    logger.info(
                        "%s: %d unreadable image(s) skipped and counted.",
                        task.name,
                        prepared[task.name].num_unreadable,
                    )
        except FinetuneInputError as failure:
            error = str(failure)
    error = broadcast_object_list([error])[0] if state.num_processes > 1 else error
    if error is not None:
        raise FinetuneInputError(error)
    if not state.is_main_process:
        for task in settings.tasks:
            prepared[task.name] = load_prepared(task, data_dir / task.folder_name)
    return prepared


# --- Running ------------------------------------------------------------------------------------------------------


def run_vtab(settings: VtabSettings, callbacks: Sequence[TrainerCallback] = ()) -> VtabResults:
    """Run every task of `settings` not finished yet; see the module docstring."""
    state = process_state()
    if not settings.tasks:
        raise FinetuneInputError("No tasks to run.")
    previous = check_output_dir(settings)
    if settings.resume and not previous:
        logger.info("Nothing to resume in %s; starting the run.", settings.output_dir)
    prepared = prepare_tasks(settings)
    results = VtabResults.load(settings.output_dir) if previous else None
    if results is None:
        results = VtabResults(str(settings.model), settings.protocol)
    names = [task.name for task in settings.tasks]
    results.planned = names + [name for name in results.tasks if name not in names]
    if state.is_main_process:
        if settings.overwrite_output_dir:
            _clear_run_outputs(settings.output_dir)
        ran = {**previous.get("tasks", {}), **{task.name: task.to_dict() for task in settings.tasks}}
        atomic_write_json(settings.output_dir / RUN_FILE, {"settings": settings.signature(), "tasks": ran})
        results.save(settings.output_dir)
    state.wait_for_everyone()
    for number, task in enumerate(settings.tasks, start=1):
        task_dir = settings.output_dir / TASKS_DIR / task.folder_name
        finished = results.tasks.get(task.name)
        if finished is None and is_finished_folder(task_dir):
            finished = result_from_folder(task, task_dir, prepared[task.name], settings)
        if finished is not None and is_finished_folder(task_dir):
            logger.info("Task %s already finished: accuracy %.4f (kept, not rerun).", task.name, finished.accuracy)
            results.tasks[task.name] = finished
        else:
            logger.info(
                "VTAB task %d of %d: %s (%s; %s, %s).",
                number,
                len(settings.tasks),
                task.name,
                task.group,
                "random flip" if task.flip else "no flip",
                "random crop" if task.crop else "no crop",
            )
            outcome = run_finetuning(make_job(settings, task, prepared[task.name], task_dir), callbacks=callbacks)
            results.tasks[task.name] = task_result(task, task_dir, prepared[task.name], outcome, settings)
            logger.info("Task %s: accuracy %.4f.", task.name, outcome.accuracy)
        if state.is_main_process:
            results.save(settings.output_dir)
    if state.is_main_process:
        earlier = [
            VtabTask.from_dict(record, where=f"{RUN_FILE} task {name}")
            for name, record in previous.get("tasks", {}).items()
            if name in results.tasks and name not in names
        ]
        finish(results, settings, [*settings.tasks, *earlier])
    state.wait_for_everyone()
    return results


def make_job(settings: VtabSettings, task: VtabTask, prepared: PreparedTask, task_dir: Path) -> FinetuneJob:
    """The engine's job for one task: the shared settings, the task's data, its Appendix B switches."""
    augmentation = {"horizontal_flip": task.flip, "random_crop": task.crop}
    return FinetuneJob(
        model=settings.model,
        data=prepared.data(settings.protocol),
        from_scratch=settings.from_scratch,
        hyperrule=settings.hyperrule,
        large_resolution=settings.large_resolution,
        rule_overrides=dict(settings.rule_overrides),
        task_augmentation={name: allowed for name, allowed in augmentation.items() if not allowed},
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        trials=settings.trials,
        seed=settings.seed,
        output_dir=task_dir,
        training=dict(settings.training),
        # An interrupted task continues from its newest checkpoint; a new one starts.
        resume=(work_dir_of(task_dir) / RUN_FILE_NAME).is_file(),
        per_class_accuracy=settings.per_class_accuracy,
        command=[*settings.command, "--tasks", task.name],  # what reruns this task alone
    )


def _evaluation_split(task: VtabTask, protocol: str) -> str:
    return task.source.test if protocol == FINAL else task.source.validation


def task_result(
    task: VtabTask, task_dir: Path, prepared: PreparedTask, outcome: FinetuneResult, settings: VtabSettings
) -> TaskResult:
    saved = outcome.trials[outcome.saved_trial - 1]
    return TaskResult(
        group=task.group,
        accuracy=float(outcome.accuracy),
        trials=[float(value) for value in outcome.accuracies],
        evaluation_split=_evaluation_split(task, settings.protocol),
        source=prepared.data(settings.protocol).source,
        num_train_examples=saved.num_train_examples,
        num_eval_examples=saved.num_eval_examples,
        unreadable_images=len(outcome.unreadable_images) + prepared.num_unreadable,
        folder=str(task_dir.relative_to(settings.output_dir)),
        confirmed=task.confirmed,
        top_5_accuracy=outcome.eval_results.get("eval_top_5_accuracy"),
    )


def result_from_folder(task: VtabTask, task_dir: Path, prepared: PreparedTask, settings: VtabSettings) -> TaskResult:
    """A finished task folder's result (the run stopped after the folder was written, before it was recorded)."""
    eval_results = json.loads((task_dir / EVAL_RESULTS_FILE).read_text())
    all_results = json.loads((task_dir / ALL_RESULTS_FILE).read_text())
    dataset = json.loads((task_dir / FINETUNE_ARGS_FILE).read_text()).get("dataset", {})
    accuracy = float(eval_results["eval_accuracy"])
    return TaskResult(
        group=task.group,
        accuracy=accuracy,
        trials=[float(value) for value in eval_results.get("eval_accuracy_trials", [accuracy])],
        evaluation_split=_evaluation_split(task, settings.protocol),
        source=prepared.data(settings.protocol).source,
        num_train_examples=dataset.get("num_train_examples"),
        num_eval_examples=dataset.get("num_eval_examples"),
        unreadable_images=int(all_results.get("unreadable_images", 0)) + prepared.num_unreadable,
        folder=str(task_dir.relative_to(settings.output_dir)),
        confirmed=task.confirmed,
        top_5_accuracy=eval_results.get("eval_top_5_accuracy"),
    )


def rule_summary(settings: VtabSettings) -> str:
    """How the rule was set, for the card: derived per task, the user's overrides, the tasks' Appendix B flags."""
    parts = [
        f"BiT-HyperRule ({settings.hyperrule}) derived from each task's training data (resolution from its image "
        "sizes, the schedule from its 1,000 examples); random flip and crop per task as the BiT paper's Appendix B."
    ]
    if settings.rule_overrides:
        given = ", ".join(f"{name}={value}" for name, value in sorted(settings.rule_overrides.items()))
        parts.append(f"Overridden for every task: {given}.")
    if settings.trials > 1:
        parts.append(f"{settings.trials} trials per task (seeds {settings.seed}..), median reported.")
    if settings.from_scratch:
        parts.append("From random weights (--from-scratch), not from the checkpoint's.")
    return " ".join(parts)


def finish(results: VtabResults, settings: VtabSettings, tasks: Sequence[VtabTask]) -> None:
    """The table (logged), the bar chart and the card, from the recorded results of `tasks`."""
    logger.info("VTAB-1k results (%s protocol):\n%s", settings.protocol, results_table(results, tasks))
    plot = save_accuracy_plot(results, settings.output_dir)
    card = build_card(
        results,
        tasks,
        command=settings.command,
        rule_summary=rule_summary(settings),
        has_plot=plot is not None,
    )
    write_card(settings.output_dir, card)
    logger.info("Results in %s (%s, %s).", settings.output_dir, RESULTS_FILE, MODEL_CARD_FILE)
