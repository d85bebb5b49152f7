"""`bit-vtab` (also `python -m vtab`, `torchrun -m vtab`, `accelerate launch -m vtab`): the VTAB-1k benchmark of a
BiT model in one command.

The command line is bit-finetune's (`finetune.command_line`): the same BiT-HyperRule, model and run flags and every
`transformers.TrainingArguments` flag with the same meaning (`--bf16`, `--torch-compile`, `--report-to`, ...), plus
the task selection. The run itself is `vtab.runner.run_vtab`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from finetune.command_line import (
    FinetuneTrainingArguments,
    HyperRuleArguments,
    ModelArguments,
    RunArguments,
    configure_logging,
    flag,
    parse_command_line,
    rule_overrides,
    sort_trainer_flags,
)
from finetune.distributed import process_state
from finetune.errors import FinetuneInputError
from finetune.hyperrule import LARGE_IMAGE_RESOLUTION_BIT_L

from .data import FINAL, PROTOCOLS
from .registry import GROUPS, REGISTRY, TRAIN_EXAMPLES, list_tasks, load_task_files, select_tasks
from .runner import VtabSettings, run_vtab

logger = logging.getLogger("vtab")

USAGE = """
  bit-vtab --model M --output-dir O [--tasks all|natural|specialized|structured|NAME ...] [options]
  bit-vtab --model M --output-dir O --task-file my_tasks.json [--tasks ...]   your own tasks ("your VTAB")
  bit-vtab --list-tasks [--task-file F]                                        the task table
  torchrun --nproc-per-node N -m vtab ...   (or accelerate launch -m vtab ...): data parallel"""


def _epilog() -> str:
    groups = []
    for group in GROUPS:
        names = [task.name + ("*" if not task.confirmed else "") for task in REGISTRY if task.group == group]
        groups.append(f"  {group} ({len(names)}): {', '.join(names)}")
    unconfirmed = [f"  * {task.name}: {task.note}" for task in REGISTRY if not task.confirmed]
    return "\n".join(
        [
            "VTAB-1k tasks (bit-vtab --list-tasks shows sources, labels and the flip/crop switches):",
            *groups,
            "Sources marked * are unconfirmed:",
            *unconfirmed,
            "",
            f"Each task fine-tunes M with BiT-HyperRule on {TRAIN_EXAMPLES:,} training examples (--protocol final: all "
            "1,000, evaluated on the test split; selection: 800, evaluated on the 200 validation examples). The "
            "19 datasets are streamed from the Hugging Face Hub the first time (only the examples used) and kept in "
            "O/data; without network, give local copies in a task file (the fields of a --list-tasks row, "
            "as JSON). Results: O/vtab_results.json, O/README.md (model card with every task's accuracy), "
            "O/vtab_accuracy.png, and each task's fine-tuned folder in O/tasks/. An interrupted run continues with "
            "--resume (finished tasks are not rerun). Flags BiT-HyperRule owns or that have no effect are refused as "
            "in bit-finetune (bit-finetune --help).",
        ]
    )


@dataclasses.dataclass
class VtabArguments:
    _argument_group_name = "VTAB-1k"

    tasks: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Tasks to run: all (default), a group (natural, specialized, structured) or task names "
            "(case, spaces, dashes and slashes do not matter: cifar100, clevr-count). With --task-file the default is the file's tasks."
        },
    )
    task_file: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "JSON file(s) of your own tasks, each with a registry row's fields (name, group, source, label, "
            "flip, crop); a task named like a registry task replaces it (e.g. to read a local copy)."
        },
    )
    list_tasks: bool = dataclasses.field(
        default=False, metadata={"help": "Print the task table (name, group, source, label, flip, crop) and exit."}
    )
    protocol: str = dataclasses.field(
        default=FINAL,
        metadata={
            "choices": PROTOCOLS,
            "help": "final: train on all 1,000 examples, evaluate on the test split (the reported numbers); selection: "
            "train on the 800, evaluate on the 200 validation examples (for comparing settings).",
        },
    )
    trials: int | None = dataclasses.field(
        default=None,
        metadata={"help": "Runs per task with seeds seed, seed+1, ...; the median is reported (default 1)."},
    )


ARGUMENT_CLASSES = (VtabArguments, HyperRuleArguments, ModelArguments, RunArguments, FinetuneTrainingArguments)
# Flags of bit-finetune's command line that a VTAB run has no use for, and why.
REFUSED = {
    "paper_rule": "it belongs to bit-finetune's main job; a VTAB run uses BiT-HyperRule unmodified except what you override",
    "push_to_hub": "a VTAB run is one folder per task: upload one with `bit-model-card O/tasks/TASK --repo-id ID --push`",
    "hub_model_id": "a VTAB run is not uploaded",
    "hub_private_repo": "a VTAB run is not uploaded",
    "hub_token": "a VTAB run is not uploaded",
}


def parse_arguments(argv: Sequence[str]):
    return parse_command_line(
        ARGUMENT_CLASSES,
        argv,
        hidden=REFUSED,
        prog="bit-vtab",
        usage=USAGE,
        description=__doc__.split("\n\n")[0],
        epilog=_epilog(),
    )


def make_settings(by_class: dict, given: frozenset[str], argv: Sequence[str]) -> VtabSettings:
    """The run's settings from the parsed command line, every combination that cannot work refused."""
    vtab_args, model_args = by_class[VtabArguments], by_class[ModelArguments]
    run_args, rule_args = by_class[RunArguments], by_class[HyperRuleArguments]
    training = by_class[FinetuneTrainingArguments]
    refused = [name for name in REFUSED if name in given]
    if refused:
        raise FinetuneInputError(f"{flag(refused[0])}: not used by bit-vtab ({REFUSED[refused[0]]}).")
    if model_args.model is None:
        raise FinetuneInputError("--model is required (a folder, Hub id or published BiT name such as BiT-M-R50x1).")
    if training.output_dir is None or "output_dir" not in given:
        raise FinetuneInputError("--output-dir is required: the run's folder (results, card, one folder per task).")
    if vtab_args.trials is not None and vtab_args.trials < 1:
        raise FinetuneInputError(f"--trials {vtab_args.trials}: expected at least 1.")
    for name in ("seed", "dataloader_num_workers"):
        if getattr(training, name) < 0:
            raise FinetuneInputError(f"{flag(name)} {getattr(training, name)}: expected a non-negative integer.")
    if run_args.resume and run_args.overwrite_output_dir:
        raise FinetuneInputError(
            "--resume continues the run in --output-dir, --overwrite-output-dir starts over: give one."
        )
    trainer_flags = sort_trainer_flags(training, given, run_args.resume, program="bit-vtab")
    own_tasks = load_task_files(vtab_args.task_file or [])
    return VtabSettings(
        model=model_args.model,
        output_dir=Path(training.output_dir),
        tasks=select_tasks(vtab_args.tasks, own_tasks),
        from_scratch=model_args.from_scratch,
        hyperrule=rule_args.hyperrule,
        large_resolution=LARGE_IMAGE_RESOLUTION_BIT_L if rule_args.bit_l_resolution else None,
        rule_overrides=rule_overrides(rule_args, trainer_flags),
        gradient_accumulation_steps=trainer_flags.gradient_accumulation_steps,
        training=trainer_flags.training,
        trials=vtab_args.trials or 1,
        seed=training.seed,
        protocol=vtab_args.protocol,
        resume=trainer_flags.resume,
        overwrite_output_dir=run_args.overwrite_output_dir,
        per_class_accuracy=run_args.per_class_accuracy,
        command=["bit-vtab", *argv],
    )


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    """Entry point of `bit-vtab`; returns the exit status (2: bad input, 130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging("vtab")
    main_process = process_state().is_main_process
    try:
        by_class, given = parse_arguments(argv)
        vtab_args = by_class[VtabArguments]
        if vtab_args.list_tasks:
            own_tasks = load_task_files(vtab_args.task_file or [])
            print(list_tasks(select_tasks(vtab_args.tasks or ["all"], own_tasks)))
            return 0
        run_vtab(make_settings(by_class, given, argv), callbacks=callbacks)
    except FinetuneInputError as error:
        if main_process:
            print(f"bit-vtab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if main_process:
            print(
                "bit-vtab: interrupted. Finished tasks are recorded in OUTPUT_DIR/vtab_results.json and the running "
                "task keeps its last checkpoint: run the same command with --resume to continue.",
                file=sys.stderr,
            )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
