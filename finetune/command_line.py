"""The command line of the fine-tuning tools (`bit-finetune` and the jobs built on it): argument dataclasses,
their parsing with `HfArgumentParser`, and the sorting of the Trainer's flags.

`FinetuneTrainingArguments` is transformers' `TrainingArguments` with bit-finetune's defaults, parsed beside the
model, data and BiT-HyperRule arguments as Hugging Face's image-classification example does, so every Trainer
flag keeps its usual meaning (`--bf16`, `--torch-compile`, `--report-to wandb`, `--deepspeed ds.json`, ...)
except the values BiT-HyperRule owns (steps, learning rate, warmup, the batch of 512 = micro-batch x processes x
accumulation, SGD with momentum and no weight decay): a value given for one of those is an override of the rule
(`sort_trainer_flags`, `rule_overrides`). Flags that would have no effect are refused rather than ignored. --help
lists dash spellings, switches without fake values, and the Trainer's flags by topic (`build_parser`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Collection, Sequence

from transformers import HfArgumentParser, TrainingArguments

from .data import DEFAULT_VALIDATION_FRACTION
from .distributed import accelerator_available, process_state
from .engine import DEFAULT_NUM_WORKERS
from .errors import FinetuneInputError
from .hyperrule import (
    BATCH_SIZE,
    FEW_SHOT_TRIALS,
    HYPERRULE_VARIANTS,
    LARGE_IMAGE_RESOLUTION,
    LARGE_IMAGE_RESOLUTION_BIT_L,
    NO_CROP_TASKS,
    NO_FLIP_TASKS,
    PAPER,
    RELEASED_SCHEDULES,
)

# --- Arguments --------------------------------------------------------------------------------------


_SMALL_RELEASED = RELEASED_SCHEDULES["small"]


@dataclasses.dataclass
class HyperRuleArguments:
    _argument_group_name = (
        "BiT-HyperRule (derived from the training data; a value given here is an override, recorded in "
        "bit_hyperrule.json)"
    )

    hyperrule: str = dataclasses.field(
        default=PAPER,
        metadata={
            "choices": HYPERRULE_VARIANTS,
            "help": "Which rule: 'paper' (the paper's text: lr x0.1 at 30/60/90% of the steps; 448/384 for large "
            "images) or 'released' (google-research/big_transfer's bit_hyperrule.py: small tasks warm up "
            f"{_SMALL_RELEASED[0]} steps and decay at {'/'.join(map(str, _SMALL_RELEASED[1:4]))} of "
            f"{_SMALL_RELEASED[4]}; 512/480 for large images).",
        },
    )
    batch_size: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": f"The batch of one optimizer step, over all processes (rule: {BATCH_SIZE}); without "
            "--learning-rate the rate is scaled with it."
        },
    )
    resolution: list[int] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "PRECROP CROP: training resize and random crop (test: resize to CROP); rule: 160 128 below 96x96 "
            "pixels, else 448 384."
        },
    )
    mixup_alpha: float | None = dataclasses.field(
        default=None, metadata={"help": "MixUp's alpha; 0 turns it off (rule: 0.1 from 20k examples, else off)."}
    )
    momentum: float | None = dataclasses.field(default=None, metadata={"help": "SGD momentum (rule: 0.9)."})
    decay_steps: list[int] | None = dataclasses.field(
        default=None,
        metadata={"help": "Steps after which the learning rate is multiplied by 0.1 (rule: 30/60/90% of the steps)."},
    )
    dataset_size: int | None = dataclasses.field(
        default=None,
        metadata={"help": "Training-set size the rule uses (needed for streams that do not declare their length)."},
    )
    median_image_area: float | None = dataclasses.field(
        default=None, metadata={"help": "Median image area in pixels the rule uses, instead of measuring it."}
    )
    bit_l_resolution: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Resolution only: large images at {}/{} (the released code, BiT-L) instead of {}/{}.".format(
                *LARGE_IMAGE_RESOLUTION_BIT_L, *LARGE_IMAGE_RESOLUTION
            )
        },
    )
    no_flip: bool = dataclasses.field(
        default=False,
        metadata={
            "help": f"No random horizontal flip, for orientation labels (paper Appendix B: {', '.join(NO_FLIP_TASKS)})."
        },
    )
    no_crop: bool = dataclasses.field(
        default=False,
        metadata={
            "help": f"No random crop, for counting/location labels (paper Appendix B: {', '.join(NO_CROP_TASKS)})."
        },
    )
    paper_rule: bool = dataclasses.field(
        default=False, metadata={"help": "Main job only: run the rule unmodified (no CPU-sized override)."}
    )


@dataclasses.dataclass
class ModelArguments:
    _argument_group_name = "Model"

    model: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Checkpoint to fine-tune: a save_pretrained folder, a Hub id or a published BiT name "
            "(BiT-M-R50x1, ...); with --from-scratch a preset name or a folder with a BiT config.json. Without data "
            "flags: the main job's checkpoint (default: the embedded one)."
        },
    )
    from_scratch: bool = dataclasses.field(
        default=False,
        metadata={"help": "Train --model's architecture (a preset name or a config) from random weights."},
    )


@dataclasses.dataclass
class DataArguments:
    _argument_group_name = "Data"

    train_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Image folder to train on: one subfolder of images per class."}
    )
    validation_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Image folder to evaluate on (default: a held-out part of --train-dir)."}
    )
    dataset: str | None = dataclasses.field(
        default=None, metadata={"help": "A datasets.load_dataset name (Hub) or a local dataset folder."}
    )
    dataset_config: str | None = dataclasses.field(default=None, metadata={"help": "Configuration of --dataset."})
    image_column: str = dataclasses.field(default="image", metadata={"help": "Column of --dataset holding images."})
    label_column: str = dataclasses.field(default="label", metadata={"help": "Column of --dataset holding labels."})
    train_split: str = dataclasses.field(default="train", metadata={"help": "Split of --dataset to train on."})
    validation_split: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Split of --dataset to evaluate on (default: validation, valid, val or test, if present)."},
    )
    streaming: bool = dataclasses.field(
        default=False, metadata={"help": "Stream --dataset instead of downloading it (give --dataset-size)."}
    )
    validation_fraction: float = dataclasses.field(
        default=DEFAULT_VALIDATION_FRACTION,
        metadata={"help": "Share of each class held out for evaluation when there is no validation split."},
    )
    examples_per_class: int | None = dataclasses.field(
        default=None, metadata={"help": "Few-shot: train on K random examples of every class (one subset per trial)."}
    )
    trials: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": f"Repeat with N seeds (and subsets); report median, min, max (default 1; main job {FEW_SHOT_TRIALS}). "
            "The folder keeps the median trial's model (even N: the lower of the two middle ones)."
        },
    )


@dataclasses.dataclass
class RunArguments:
    _argument_group_name = "Run"

    resume: bool = dataclasses.field(
        default=False,
        metadata={"help": "Continue the unfinished run in --output-dir from its newest complete checkpoint."},
    )
    overwrite_output_dir: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Replace what --output-dir holds (a finished result, an unfinished run, other files); without it "
            "a non-empty --output-dir is refused."
        },
    )
    per_class_accuracy: bool = dataclasses.field(
        default=False, metadata={"help": "Also report the accuracy of every class."}
    )


@dataclasses.dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with bit-finetune's defaults and the spellings its command line had."""

    output_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "Folder for the fine-tuned model (required with your own data)."}
    )
    per_device_train_batch_size: int = dataclasses.field(
        default=8,
        metadata={
            "help": "Images per forward pass on each process (default: the largest divisor of the batch that fits "
            "the device); gradient accumulation makes up the rest of the batch.",
            "aliases": ["--micro-batch-size"],
        },
    )
    dataloader_num_workers: int = dataclasses.field(
        default=DEFAULT_NUM_WORKERS,
        metadata={"help": "DataLoader worker processes decoding images.", "aliases": ["--num-workers"]},
    )
    seed: int = dataclasses.field(
        default=0, metadata={"help": "Seed of the subsets, data order, augmentation, MixUp and random weights."}
    )

    def __post_init__(self):
        # On a machine without an accelerator, mixed precision means CPU autocast: transformers asks for --use-cpu
        # for that, which is all there is here anyway.
        if not self.use_cpu and not accelerator_available():
            self.use_cpu = True
        if self.fp16 and self.use_cpu:
            # accelerate runs fp16 on a CPU as plain float32, without a word: refuse rather than mislabel the run.
            raise FinetuneInputError(
                "--fp16 needs a GPU: on a CPU it would silently train in float32. Use --bf16 (CPU autocast)."
            )
        super().__post_init__()


# Trainer fields BiT-HyperRule owns: given, they override the rule's field of the same meaning.
RULE_OWNED_TRAINER_FIELDS = {
    "max_steps": "steps",
    "learning_rate": "learning_rate",
    "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay",
    "per_device_train_batch_size": "micro_batch_size",
}
RULE_OWNED_HELP = {
    "max_steps": "Optimizer steps (rule: 500 below 20k examples, 10k below 500k, else 20k).",
    "learning_rate": "Base learning rate (rule: 0.003 at batch 512).",
    "warmup_steps": "Linear warmup steps, or a fraction of the steps below 1 (rule: 100 of 500, 500 of 10k/20k).",
    "weight_decay": "Weight decay (rule: none).",
    "gradient_accumulation_steps": "Micro-batches per optimizer step on each process (default: what the batch "
    "and the micro-batch leave).",
}
# Trainer fields bit-finetune handles itself rather than passing them to each trial's Trainer.
HANDLED_TRAINER_FIELDS = frozenset(
    {*RULE_OWNED_TRAINER_FIELDS, "gradient_accumulation_steps", "output_dir", "seed", "push_to_hub", "hub_model_id"}
    | {"hub_private_repo", "hub_token", "resume_from_checkpoint", "optim", "do_train", "do_eval", "do_predict"}
)
# Trainer fields that would have no effect, or conflict with the rule without being one of its fields.
REFUSED_TRAINER_FIELDS = {
    "optim_args": "SGD's momentum is the rule's: use --momentum",
    "lr_scheduler_type": "BiT-HyperRule's schedule is a linear warmup and staircase decays (--warmup-steps, --decay-steps)",
    "lr_scheduler_kwargs": "BiT-HyperRule's schedule is a linear warmup and staircase decays (--warmup-steps, --decay-steps)",
    "num_train_epochs": "BiT-HyperRule trains for a number of steps: use --max-steps",
    "adam_beta1": "BiT-HyperRule trains with SGD",
    "adam_beta2": "BiT-HyperRule trains with SGD",
    "adam_epsilon": "BiT-HyperRule trains with SGD",
    "optim_target_modules": "BiT-HyperRule trains with SGD",
    "label_smoothing_factor": "the MixUp loss uses the labels as they are",
    "auto_find_batch_size": "the micro-batch is chosen to fit the device, and the batch is kept by accumulation",
    "data_seed": "the data order follows --seed (and each trial's seed)",
    "train_sampling_strategy": "the data order is BiT's seeded per-epoch shuffle",
    "remove_unused_columns": "batches carry the images' names for the unreadable-image count",
    "label_names": "the labels are the data's label column",
    "batch_eval_metrics": "accuracy is computed over the whole evaluation set",
    "prediction_loss_only": "bit-finetune reports accuracy",
    "hub_strategy": "the finished folder is uploaded once, at the end",
    "hub_always_push": "the finished folder is uploaded once, at the end",
    "hub_revision": "the finished folder is uploaded to the main branch",
    **dict.fromkeys(
        (
            "neftune_noise_alpha",
            "use_liger_kernel",
            "liger_kernel_config",
            "use_cache",
            "include_num_input_tokens_seen",
            "average_tokens_across_devices",
            "length_column_name",
        ),
        "a text-model setting, with no meaning for an image classifier",
    ),
}
# The Trainer's flags in --help, by topic (the rest under "Other Trainer flags").
TRAINER_TOPICS = {
    "Precision and speed": (
        "bf16",
        "fp16",
        "bf16_full_eval",
        "fp16_full_eval",
        "tf32",
        "torch_compile",
        "torch_compile_backend",
        "torch_compile_mode",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "use_cpu",
        "torch_empty_cache_steps",
        "max_grad_norm",
    ),  # fmt: skip
    "Data loading and evaluation": (
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        "dataloader_in_order",
        "dataloader_drop_last",
        "per_device_eval_batch_size",
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "eval_on_start",
        "eval_accumulation_steps",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "include_for_metrics",
        "bf16_full_eval",
    ),  # fmt: skip
    "Logging and tracking": (
        "logging_steps",
        "logging_strategy",
        "logging_first_step",
        "logging_nan_inf_filter",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "report_to",
        "run_name",
        "project",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        "disable_tqdm",
        "skip_memory_metrics",
        "debug",
    ),  # fmt: skip
    "Checkpoints": (
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_only_model",
        "save_on_each_node",
        "enable_jit_checkpoint",
        "load_best_model_at_end",
        "metric_for_best_model",
        "greater_is_better",
        "ignore_data_skip",
        "restore_callback_states_from_checkpoint",
        "resume_from_checkpoint",
    ),  # fmt: skip
    "Multi-GPU and distributed (torchrun / accelerate launch)": (
        "ddp_find_unused_parameters",
        "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers",
        "ddp_static_graph",
        "ddp_backend",
        "ddp_timeout",
        "fsdp",
        "fsdp_config",
        "deepspeed",
        "accelerator_config",
        "parallelism_config",
        "local_rank",
    ),  # fmt: skip
    "Hugging Face Hub (the finished folder, uploaded by the main process)": (
        "push_to_hub",
        "hub_model_id",
        "hub_private_repo",
        "hub_token",
    ),  # fmt: skip
}
RESUME_ALIASES = ("true", "latest", "1", "yes")
# Trainer fields whose default here differs from the Trainer's, or whose meaning bit-finetune narrows.
BIT_FINETUNE_TRAINER_HELP = {
    "logging_steps": "Log every this many steps (default: 50 entries per run), or a fraction of the steps below 1.",
    "save_steps": "Checkpoint every this many steps (default: 10 checkpoints per run), or a fraction of the steps "
    "below 1.",
    "save_total_limit": "Checkpoints kept per trial (default: 1, the newest complete one).",
    "per_device_eval_batch_size": "Images per evaluation forward pass (default: twice the micro-batch).",
    "max_grad_norm": "Gradient clipping norm (default: 0, none: BiT does not clip).",
    "dataloader_pin_memory": "Pin host memory for host-to-device copies (default: on with CUDA).",
    "push_to_hub": "Upload the finished folder (model, card, widget examples) to the Hub, from the main process.",
    "hub_model_id": "Hub repository to upload to (default: the output folder's name under your account).",
    "hub_private_repo": "Create the repository private (an existing repository keeps its visibility).",
    "report_to": "Trackers to send the training logs to: none (default), all, or names such as tensorboard, wandb, "
    "trackio, mlflow.",
}


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Dash spellings only, switches without a fake value, defaults shown where the help does not say them."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=119)

    @staticmethod
    def _is_switch(action) -> bool:
        return action.nargs == 0 or (action.nargs == "?" and action.const is True)

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        dashed = {option.replace("_", "-") for option in action.option_strings if "-" in option[2:]}
        shown = [
            option for option in action.option_strings if "_" not in option or option.replace("_", "-") not in dashed
        ]
        if self._is_switch(action):
            return ", ".join(shown)
        return ", ".join(shown) + " " + self._format_args(action, self._get_default_metavar_for_optional(action))

    def _get_default_metavar_for_optional(self, action):
        return action.dest.upper()

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            default not in (None, False, "", argparse.SUPPRESS)
            and not self._is_switch(action)
            and "default" not in text.lower()
            and "rule:" not in text
        ):
            text += f" (default: {default})"
        # argparse formats help with %: TrainingArguments' texts escape it already, ours do not.
        return text.replace("%%", "%").replace("%", "%%")


def build_parser(
    argument_classes: Sequence[type], *, hidden: Collection[str] = (), **parser_options
) -> HfArgumentParser:
    """An `HfArgumentParser` of `argument_classes` (a `FinetuneTrainingArguments` among them) whose --help groups
    the Trainer's flags (`_regroup_trainer_flags`) and leaves out the fields `hidden` (a tool that refuses them);
    `parser_options` are argparse's (prog, usage, epilog, ...)."""
    parser = HfArgumentParser(argument_classes, formatter_class=HelpFormatter, **parser_options)
    _regroup_trainer_flags(parser)
    for action in parser._actions:
        if action.dest in hidden:
            action.help = argparse.SUPPRESS
    return parser


def parse_command_line(
    argument_classes: Sequence[type], argv: Sequence[str], *, hidden: Collection[str] = (), **parser_options
) -> tuple[dict[type, object], frozenset[str]]:
    """({argument class: its parsed instance}, the fields the command line set, whatever their value).

    The dataclasses' own checks run (TrainingArguments' among them: e.g. --tf32 without a GPU); their
    errors become `FinetuneInputError`s."""
    argv = list(argv)
    try:
        parsed = build_parser(argument_classes, hidden=hidden, **parser_options).parse_args_into_dataclasses(
            args=argv, look_for_args_file=False
        )
    except FinetuneInputError:  # our own checks' messages, as they are
        raise
    except (ValueError, ImportError) as error:
        raise FinetuneInputError(_trainer_error(error)) from error
    given_parser = build_parser(argument_classes, hidden=hidden, **parser_options)
    for action in given_parser._actions:
        action.default = argparse.SUPPRESS
    given = frozenset(vars(given_parser.parse_args(argv)))
    return {type(arguments): arguments for arguments in parsed}, given


def _regroup_trainer_flags(parser: HfArgumentParser) -> None:
    """Show the Trainer fields the rule owns in the BiT-HyperRule group, the others by topic; hide the refused."""
    groups = {group.title: group for group in parser._action_groups}
    rule_group = groups.get(HyperRuleArguments._argument_group_name) or parser.add_argument_group(
        HyperRuleArguments._argument_group_name
    )
    run_group = groups.get(RunArguments._argument_group_name) or parser.add_argument_group(
        RunArguments._argument_group_name
    )
    trainer_actions = [
        action
        for action in parser._actions
        if action.dest in {field.name for field in dataclasses.fields(TrainingArguments)}
    ]
    for group in parser._action_groups:
        group._group_actions[:] = [action for action in group._group_actions if action not in trainer_actions]
    by_dest: dict[str, list] = {}
    for action in trainer_actions:
        by_dest.setdefault(action.dest, []).append(action)
    for name in (*RULE_OWNED_TRAINER_FIELDS, "gradient_accumulation_steps"):
        for action in by_dest.pop(name):
            if name in RULE_OWNED_HELP:
                action.help = RULE_OWNED_HELP[name]
            rule_group._group_actions.append(action)
    for name in (*REFUSED_TRAINER_FIELDS, "optim", "do_train", "do_eval", "do_predict", "output_dir", "seed"):
        for action in by_dest.pop(name, []):
            if name in ("output_dir", "seed"):
                run_group._group_actions.insert(0, action)
            else:
                action.help = argparse.SUPPRESS
    for actions in by_dest.values():
        for action in actions:
            if action.dest in BIT_FINETUNE_TRAINER_HELP and not isinstance(action, argparse._StoreFalseAction):
                action.help = BIT_FINETUNE_TRAINER_HELP[action.dest]
            if isinstance(action, argparse._StoreFalseAction):
                action.help = f"Turn {flag(action.dest)} off."
    for title, names in TRAINER_TOPICS.items():
        topic = parser.add_argument_group(title)
        for name in names:
            topic._group_actions.extend(by_dest.pop(name, []))
    other = parser.add_argument_group("Other Trainer flags (transformers.TrainingArguments)")
    for actions in by_dest.values():
        other._group_actions.extend(actions)
    parser._action_groups[:] = [group for group in parser._action_groups if group._group_actions]


def _trainer_error(error: Exception) -> str:
    text = str(error)
    if "deepspeed" in text.lower():
        return f"--deepspeed needs the deepspeed package (pip install deepspeed): {text}"
    return f"{text} (a check of transformers' TrainingArguments)"


# --- Trainer flags: rule overrides, Trainer settings, refusals -------------------------------------------


@dataclasses.dataclass
class TrainerFlags:
    """The given Trainer fields, sorted by who owns them."""

    rule_overrides: dict
    gradient_accumulation_steps: int | None
    training: dict  # passed to every trial's Trainer
    resume: bool


def sort_trainer_flags(
    training_args: FinetuneTrainingArguments,
    given: frozenset[str],
    resume: bool = False,
    *,
    program: str = "bit-finetune",
) -> TrainerFlags:
    """The given Trainer fields as rule overrides, Trainer settings for every trial and the resume switch
    (`resume`: --resume, which --resume-from-checkpoint latest also sets); refused ones raise, naming `program`."""
    refused = [name for name in REFUSED_TRAINER_FIELDS if name in given]
    if refused:
        name = refused[0]
        raise FinetuneInputError(f"{flag(name)}: not used by {program} ({REFUSED_TRAINER_FIELDS[name]}).")
    optimizer = getattr(training_args.optim, "value", training_args.optim)
    if "optim" in given and optimizer != "sgd":
        raise FinetuneInputError(
            f"--optim {optimizer}: BiT-HyperRule fine-tunes with SGD and momentum (--momentum); for another "
            "optimizer use finetune.BitTrainer with your own TrainingArguments."
        )
    overrides = {}
    for name, field in RULE_OWNED_TRAINER_FIELDS.items():
        if name in given:
            overrides[field] = getattr(training_args, name)
    if (
        "warmup_steps" in overrides
        and overrides["warmup_steps"] != int(overrides["warmup_steps"])
        and not 0 < overrides["warmup_steps"] < 1
    ):
        raise FinetuneInputError(
            f"--warmup-steps {overrides['warmup_steps']}: expected a whole number of steps or a fraction below 1."
        )
    if "resume_from_checkpoint" in given:
        value = str(training_args.resume_from_checkpoint).strip().lower()
        if value not in RESUME_ALIASES:
            raise FinetuneInputError(
                f"--resume-from-checkpoint {training_args.resume_from_checkpoint}: {program} resumes its own run in "
                "--output-dir from the newest complete checkpoint: pass --resume (or --resume-from-checkpoint latest)."
            )
        resume = True
    training = {
        name: getattr(training_args, name)
        for name in given
        if name in {field.name for field in dataclasses.fields(TrainingArguments)}
        and name not in HANDLED_TRAINER_FIELDS
    }
    if training_args.use_cpu:
        training["use_cpu"] = True
    accumulation = training_args.gradient_accumulation_steps if "gradient_accumulation_steps" in given else None
    return TrainerFlags(overrides, accumulation, training, resume)


def rule_overrides(rule_args: HyperRuleArguments, trainer_flags: TrainerFlags) -> dict:
    """The BitHyperRule fields the command line sets (the rule's own flags and the rule-owned Trainer flags)."""
    precrop, crop = (None, None)
    if rule_args.resolution is not None:
        if len(rule_args.resolution) != 2:
            raise FinetuneInputError(f"--resolution takes two numbers, PRECROP CROP; got {rule_args.resolution}.")
        precrop, crop = rule_args.resolution
    values = {
        **trainer_flags.rule_overrides,
        "batch_size": rule_args.batch_size,
        "precrop": precrop,
        "crop": crop,
        "mixup_alpha": rule_args.mixup_alpha,
        "momentum": rule_args.momentum,
        "decay_steps": tuple(rule_args.decay_steps) if rule_args.decay_steps is not None else None,
        "dataset_size": rule_args.dataset_size,
        "median_image_area": rule_args.median_image_area,
        "random_crop": False if rule_args.no_crop else None,
        "horizontal_flip": False if rule_args.no_flip else None,
    }
    return {name: value for name, value in values.items() if value is not None}


# --- Logging ---------------------------------------------------------------------------------------------


class _StdoutHandler(logging.Handler):
    """Writes to whatever `sys.stdout` is at the time (it may be replaced, e.g. by a capturing caller)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # logging's contract: report through handleError, never raise into the caller
            self.handleError(record)


def configure_logging(*packages: str) -> None:
    """The messages of the "finetune" loggers (and of `packages`' loggers) as plain lines on stdout, from the main
    process only."""
    level = logging.INFO if process_state().is_main_process else logging.WARNING
    for name in ("finetune", *packages):
        package_logger = logging.getLogger(name)
        if not package_logger.handlers:
            handler = _StdoutHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            package_logger.addHandler(handler)
        package_logger.setLevel(level)
        package_logger.propagate = False
