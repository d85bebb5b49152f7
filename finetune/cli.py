"""`bit-finetune` (also `python -m finetune`, `torchrun -m finetune`, `accelerate launch -m finetune`): fine-tune
a BiT model on your images with BiT-HyperRule.

The command line parses transformers' `TrainingArguments` beside bit-finetune's model, data and rule arguments
with `HfArgumentParser`, as Hugging Face's image-classification example does: every Trainer flag keeps its
usual meaning (`--bf16`, `--torch-compile`, `--report-to wandb`, `--deepspeed ds.json`, ...), except the values
BiT-HyperRule owns (steps, learning rate, warmup, the batch of 512 = micro-batch x processes x accumulation,
SGD with momentum and no weight decay): a value given for one of those is an override of the rule, printed
and recorded under `overrides` in `bit_hyperrule.json`. This module only parses, validates and prints; the
fine-tuning itself is `finetune.engine.run_finetuning`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
from transformers import TrainerCallback

from .command_line import (
    RULE_OWNED_TRAINER_FIELDS,
    DataArguments,
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
from .data import ImageClassificationData, load_hub_dataset, load_image_folders
from .distributed import process_state
from .duplicates import DeduplicatedEvaluation
from .engine import FinetuneJob, FinetuneResult, run_finetuning
from .errors import FinetuneInputError
from .hyperrule import LARGE_IMAGE_RESOLUTION_BIT_L
from .main_job import MainJobSettings, run_main_job
from .output_folder import HubUploadError, push_to_hub
from .search import APPENDIX_A, SearchJob, run_search

logger = logging.getLogger("finetune")

USAGE = """
  bit-finetune --model M --train-dir D [--validation-dir V] --output-dir O [options]
  bit-finetune --model M --dataset NAME [--dataset-config C] [--image-column image] [--label-column label]
               [--streaming --dataset-size N] --output-dir O [options]
  bit-finetune [--output-dir O]      the main job: the embedded upstream checkpoint vs random init on
                                     scikit-learn's digits, 1/5/10 examples per class and the full set
  torchrun --nproc-per-node N -m finetune ...   (or accelerate launch -m finetune ...): data parallel"""

EPILOG = """\
M is anything `from_pretrained` takes (a saved folder, a Hub id, a published BiT name such as BiT-M-R50x1), or
with --from-scratch a preset name (bit-tiny, BiT-M-R50x1, ...) trained from random weights. Every BiT-HyperRule
value not given is derived from the training data; the ones given are recorded as overrides in
O/bit_hyperrule.json. An O holding a finished result is replaced only with --overwrite-output-dir (the new folder
replaces it when complete); an unfinished run in O is continued with --resume.

Trainer flags that would have no effect here, or that BiT-HyperRule owns without a field for them, are refused
with a message rather than ignored: --optim other than sgd, --optim-args (use --momentum), --lr-scheduler-type,
--lr-scheduler-kwargs, --num-train-epochs (use --max-steps), --adam-*, --label-smoothing-factor,
--auto-find-batch-size, --data-seed, --train-sampling-strategy, --remove-unused-columns, --label-names,
--batch-eval-metrics, --prediction-loss-only, --hub-strategy, --hub-always-push, --hub-revision and the text-model
flags (--neftune-noise-alpha, --use-liger-kernel, --liger-kernel-config, --use-cache,
--include-num-input-tokens-seen, --average-tokens-across-devices, --length-column-name, --optim-target-modules).
--do-train, --do-eval and --do-predict are accepted, as in HF example command lines: bit-finetune always trains
and evaluates."""


@dataclasses.dataclass
class AnalysisArguments:
    """The paper's two analyses on a fine-tuning run: random search (§4.4, Appendix A) and near-duplicates (§4.5)."""

    _argument_group_name = "Random search (paper §4.4, Appendix A) and near-duplicates (§4.5)"

    search: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Random search: N trials of Appendix A's space (learning rate, steps, pre-logits dropout, decay "
            "toward the initial weights, MixUp, resolution) through Trainer.hyperparameter_search (optuna), selected "
            "on a validation split held out of the training set, the chosen one reported on the evaluation split "
            "(the test split). --resume continues a killed search."
        },
    )
    search_processes: int = dataclasses.field(
        default=1, metadata={"help": "Worker processes running trials side by side (CPU)."}
    )
    search_steps: list[int] | None = dataclasses.field(
        default=None,
        metadata={"help": f"Replace the searched step counts (Appendix A: {' '.join(map(str, APPENDIX_A.steps))})."},
    )
    search_resolutions: list[int] | None = dataclasses.field(
        default=None,
        metadata={
            "help": f"Replace the searched resolutions (Appendix A: {' '.join(map(str, APPENDIX_A.resolution))})."
        },
    )
    pre_logits_dropout: float | None = dataclasses.field(
        default=None, metadata={"help": "Dropout rate on the pre-logits while training (BiT-HyperRule: none)."}
    )
    decay_to_initial_weights: float | None = dataclasses.field(
        default=None,
        metadata={"help": "Weight decay toward the weights fine-tuning starts from (BiT-HyperRule: none)."},
    )
    exclude_duplicates: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "A duplicates.json from bit-dedup: also report the accuracy on the evaluation split without its "
            "near-duplicates (paper Table 6)."
        },
    )

    def regularizers(self) -> dict:
        """The `BitTrainingArguments` fields these flags set."""
        values = {
            "pre_logits_dropout": self.pre_logits_dropout,
            "decay_to_initial_weights": self.decay_to_initial_weights,
        }
        for name, value in values.items():
            if value is not None and not (0 <= value < 1 if name == "pre_logits_dropout" else value >= 0):
                raise FinetuneInputError(f"{flag(name)} {value}: expected a rate in [0, 1) / a strength >= 0.")
        return {name: value for name, value in values.items() if value}

    def search_job(self, job: FinetuneJob, validation_fraction: float) -> SearchJob:
        space = dataclasses.replace(
            APPENDIX_A,
            steps=tuple(self.search_steps or APPENDIX_A.steps),
            resolution=tuple(self.search_resolutions or APPENDIX_A.resolution),
        )
        if self.exclude_duplicates or self.regularizers():
            raise FinetuneInputError(
                "--search draws the dropout and decay of each trial; evaluate its folder without near-duplicates with "
                "bit-dedup --finetuned-model O, not --exclude-duplicates."
            )
        return SearchJob(job, self.search, space, self.search_processes, validation_fraction)


@dataclasses.dataclass
class Arguments:
    """The parsed command line; `given` holds the fields the command line set (whatever their value)."""

    rule: HyperRuleArguments
    model: ModelArguments
    data: DataArguments
    run: RunArguments
    training: FinetuneTrainingArguments
    given: frozenset[str]
    analysis: AnalysisArguments = dataclasses.field(default_factory=AnalysisArguments)

    def given_flags(self, names: Sequence[str]) -> list[str]:
        return [flag(name) for name in names if name in self.given]


# HyperRule first in --help, then what to train, on what, and how the run goes; the Trainer's own flags last.
ARGUMENT_CLASSES = (
    HyperRuleArguments,
    ModelArguments,
    DataArguments,
    RunArguments,
    AnalysisArguments,
    FinetuneTrainingArguments,
)


def parse_arguments(argv: Sequence[str]) -> Arguments:
    """Parse (and, through the dataclasses' checks, validate) a command line; what was given is remembered."""
    by_class, given = parse_command_line(
        ARGUMENT_CLASSES,
        argv,
        prog="bit-finetune",
        usage=USAGE,
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
    )
    return Arguments(
        rule=by_class[HyperRuleArguments],
        model=by_class[ModelArguments],
        data=by_class[DataArguments],
        run=by_class[RunArguments],
        training=by_class[FinetuneTrainingArguments],
        given=given,
        analysis=by_class[AnalysisArguments],
    )


# --- Checks --------------------------------------------------------------------------------------------


def check_arguments(arguments: Arguments) -> None:
    """Combinations that cannot work, refused before anything is loaded."""
    data_args, training = arguments.data, arguments.training
    if data_args.train_dir is not None and data_args.dataset is not None:
        raise FinetuneInputError("Give either --train-dir (an image folder) or --dataset (a datasets name), not both.")
    if data_args.validation_dir is not None and data_args.train_dir is None:
        raise FinetuneInputError("--validation-dir goes with --train-dir; with --dataset use --validation-split.")
    if data_args.dataset_config is not None and data_args.dataset is None:
        raise FinetuneInputError("--dataset-config goes with --dataset.")
    if data_args.streaming and data_args.dataset is None:
        raise FinetuneInputError("--streaming goes with --dataset (image folders are read from disk).")
    if arguments.model.model is None:
        raise FinetuneInputError("--model is required with your own data (a folder, Hub id or published BiT name).")
    if training.output_dir is None or "output_dir" not in arguments.given:
        raise FinetuneInputError("--output-dir is required with your own data.")
    if data_args.trials is not None and data_args.trials < 1:
        raise FinetuneInputError(f"--trials {data_args.trials}: expected at least 1.")
    for name, least in (("seed", 0), ("dataloader_num_workers", 0)):
        value = getattr(training, name)
        if value < least:
            raise FinetuneInputError(f"{flag(name)} {value}: expected an integer of at least {least}.")
    if "save_steps" in arguments.given and not training.save_steps > 0:
        raise FinetuneInputError(
            f"--save-steps {training.save_steps:g}: expected a positive number of steps (or a fraction of the run below 1)."
        )
    if "hub_model_id" in arguments.given and not training.push_to_hub:
        raise FinetuneInputError("--hub-model-id goes with --push-to-hub.")
    if arguments.rule.paper_rule:
        raise FinetuneInputError(
            "--paper-rule belongs to the main job (it drops the job's CPU-sized override); a run on your data already "
            "uses BiT-HyperRule unmodified, except the fields you override."
        )
    if arguments.run.resume and arguments.run.overwrite_output_dir:
        raise FinetuneInputError(
            "--resume continues the run in --output-dir, --overwrite-output-dir starts over: give one."
        )
    dataset_only = arguments.given_flags(("image_column", "label_column", "train_split", "validation_split"))
    if data_args.train_dir is not None and dataset_only:
        raise FinetuneInputError(f"{', '.join(dataset_only)} go(es) with --dataset, not with --train-dir.")
    if data_args.validation_dir is not None and "validation_fraction" in arguments.given:
        raise FinetuneInputError(
            "--validation-fraction holds out part of the training set; with --validation-dir nothing is held out."
        )


# --- The main job ------------------------------------------------------------------------------------------

# What the main job takes besides its own flags: the rule's overrides (on top of its CPU-sized one), the
# output folder and its upload, the seed, and the decoding workers.
MAIN_JOB_FIELDS = frozenset(
    {
        "model",
        "trials",
        "hyperrule",
        "batch_size",
        "resolution",
        "mixup_alpha",
        "momentum",
        "decay_steps",
        "no_flip",
        "no_crop",
        "paper_rule",
        "overwrite_output_dir",
        "per_class_accuracy",
        "output_dir",
        "seed",
        "push_to_hub",
        "hub_model_id",
        "hub_private_repo",
        "hub_token",
        "dataloader_num_workers",
        "use_cpu",
        *RULE_OWNED_TRAINER_FIELDS,
    }
)


def main_job_settings(arguments: Arguments, argv: Sequence[str]) -> MainJobSettings:
    """The main job's settings; the flags it has no use for are refused (rather than ignored)."""
    unused = sorted(arguments.given - MAIN_JOB_FIELDS)
    if unused:
        raise FinetuneInputError(
            f"{', '.join(flag(name) for name in unused)}: not used by the main job (it runs when no --train-dir or "
            "--dataset is given)."
        )
    if arguments.data.trials is not None and arguments.data.trials < 1:
        raise FinetuneInputError(f"--trials {arguments.data.trials}: expected at least 1.")
    trainer_flags = sort_trainer_flags(arguments.training, arguments.given, arguments.run.resume)
    overrides = rule_overrides(arguments.rule, trainer_flags)
    if arguments.rule.paper_rule and overrides:
        raise FinetuneInputError(
            f"--paper-rule runs the rule unmodified, but these are overridden: {sorted(overrides)}."
        )
    output_dir = arguments.training.output_dir if "output_dir" in arguments.given else None
    if arguments.training.push_to_hub and output_dir is None:
        raise FinetuneInputError("--push-to-hub needs --output-dir to save the main job's full-set model first.")
    if "hub_model_id" in arguments.given and not arguments.training.push_to_hub:
        raise FinetuneInputError("--hub-model-id goes with --push-to-hub.")
    if arguments.run.overwrite_output_dir and output_dir is None:
        raise FinetuneInputError("--overwrite-output-dir goes with --output-dir.")
    return MainJobSettings(
        checkpoint=arguments.model.model,
        rule_overrides=overrides,
        paper_rule=arguments.rule.paper_rule,
        hyperrule=arguments.rule.hyperrule,
        trials=arguments.data.trials,
        seed=arguments.training.seed,
        output_dir=output_dir,
        overwrite_output_dir=arguments.run.overwrite_output_dir,
        per_class_accuracy=arguments.run.per_class_accuracy,
        num_workers=arguments.training.dataloader_num_workers,
        command=["bit-finetune", *argv],
    )


def main_job(arguments: Arguments, argv: Sequence[str]) -> None:
    result = run_main_job(main_job_settings(arguments, argv))
    if result.folder is not None and arguments.training.push_to_hub and process_state().is_main_process:
        repo_id = push_to_hub(
            result.folder,
            arguments.training.hub_model_id,
            private=arguments.training.hub_private_repo,
            token=arguments.training.hub_token,
        )
        logger.info("Uploaded to the Hub as %s", repo_id)


# --- A fine-tuning run on the user's data --------------------------------------------------------------


@contextlib.contextmanager
def quiet_local_loading(is_local: bool) -> Iterator[None]:
    """`datasets` shows "Downloading data" and "Generating split" bars for a local folder too: nothing is
    downloaded, so they are hidden there (a Hub dataset keeps its real download bars)."""
    enabled = datasets.is_progress_bar_enabled()
    if is_local:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def load_data(arguments: Arguments) -> ImageClassificationData:
    data_args, seed = arguments.data, arguments.training.seed
    if data_args.train_dir is not None:
        with quiet_local_loading(True):
            return load_image_folders(
                data_args.train_dir,
                data_args.validation_dir,
                validation_fraction=data_args.validation_fraction,
                seed=seed,
            )
    with quiet_local_loading(Path(data_args.dataset).exists()):
        return load_hub_dataset(
            data_args.dataset,
            data_args.dataset_config,
            image_column=data_args.image_column,
            label_column=data_args.label_column,
            train_split=data_args.train_split,
            validation_split=data_args.validation_split,
            streaming=data_args.streaming,
            validation_fraction=data_args.validation_fraction,
            seed=seed,
        )


def make_job(arguments: Arguments, argv: Sequence[str]) -> FinetuneJob:
    """The engine's job for a run on the user's data (the data loaded and checked)."""
    check_arguments(arguments)
    trainer_flags = sort_trainer_flags(arguments.training, arguments.given, arguments.run.resume)
    overrides = rule_overrides(arguments.rule, trainer_flags)
    data = load_data(arguments)
    duplicates = arguments.analysis.exclude_duplicates
    return FinetuneJob(
        model=arguments.model.model,
        data=data,
        from_scratch=arguments.model.from_scratch,
        hyperrule=arguments.rule.hyperrule,
        large_resolution=LARGE_IMAGE_RESOLUTION_BIT_L if arguments.rule.bit_l_resolution else None,
        rule_overrides=overrides,
        gradient_accumulation_steps=trainer_flags.gradient_accumulation_steps,
        examples_per_class=arguments.data.examples_per_class,
        trials=arguments.data.trials or 1,
        seed=arguments.training.seed,
        output_dir=arguments.training.output_dir,
        training={**trainer_flags.training, **arguments.analysis.regularizers()},
        resume=trainer_flags.resume,
        overwrite_output_dir=arguments.run.overwrite_output_dir,
        per_class_accuracy=arguments.run.per_class_accuracy,
        command=["bit-finetune", *argv],
        extra_results=DeduplicatedEvaluation(duplicates, data.eval, _test_set_name(data)) if duplicates else None,
    )


def _test_set_name(data: ImageClassificationData) -> str:
    """The evaluation split's name for Table 6: its folder, or the dataset and split."""
    source = data.source
    if "validation_dir" in source:
        return Path(source["validation_dir"]).name
    if "name" in source:
        return f"{source['name']} {source.get('validation_split', '(held out)')}"
    return f"{Path(source['train_dir']).name} (held out)"


def finetune_on_user_data(
    arguments: Arguments, argv: Sequence[str], callbacks: Sequence[TrainerCallback] = ()
) -> FinetuneResult:
    """Fine-tune on the user's data; report, and upload the folder from the main process when asked."""
    job = make_job(arguments, argv)
    # Reading the output folder before the data is loaded would be cheaper, but the run's signature names the
    # data: the engine checks both before anything is written.
    result = run_finetuning(job, callbacks=callbacks)
    if process_state().is_main_process:
        report(result)
        if arguments.training.push_to_hub:
            repo_id = push_to_hub(
                result.folder,
                arguments.training.hub_model_id,
                private=arguments.training.hub_private_repo,
                token=arguments.training.hub_token,
            )
            logger.info("Uploaded to the Hub as %s", repo_id)
    return result


def report(result: FinetuneResult) -> None:
    eval_results = result.eval_results
    if result.unreadable_images:
        logger.info(
            "Skipped %d unreadable image(s): %s", len(result.unreadable_images), ", ".join(result.unreadable_images)
        )
    accuracy = eval_results["eval_accuracy"]
    trials = len(result.trials)
    top_5 = eval_results.get("eval_top_5_accuracy")
    if trials > 1:
        logger.info(
            "Accuracy over %d trials: median %.4f (min %.4f, max %.4f).",
            trials,
            accuracy,
            eval_results["eval_accuracy_min"],
            eval_results["eval_accuracy_max"],
        )
        which = "the median" if trials % 2 else "the lower of the two middle ones, whose mean is the median"
        logger.info(
            "Saved the model of trial %d of %d: accuracy %.4f, %s%s.",
            result.saved_trial,
            trials,
            eval_results["eval_accuracy_saved_trial"],
            which,
            f"; its top-5 accuracy {top_5:.4f}" if top_5 is not None else "",
        )
    else:
        logger.info("Accuracy %.4f.", accuracy)
        if top_5 is not None:
            logger.info("Top-5 accuracy %.4f.", top_5)
    if result.folder is not None:
        logger.info("Saved the fine-tuned model in %s", result.folder)


# --- Entry point ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    """Entry point of `bit-finetune`; returns the exit status (2: bad input, 3: saved but not uploaded,
    130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    main_process = process_state().is_main_process
    try:
        arguments = parse_arguments(argv)
        if arguments.data.train_dir is None and arguments.data.dataset is None:
            main_job(arguments, argv)
        elif arguments.analysis.search is not None:
            if arguments.training.push_to_hub:
                raise FinetuneInputError(
                    "--search with --push-to-hub: upload the finished folder with bit-model-card."
                )
            job = make_job(arguments, argv)
            run_search(arguments.analysis.search_job(job, arguments.data.validation_fraction))
        else:
            finetune_on_user_data(arguments, argv, callbacks=callbacks)
    except FinetuneInputError as error:
        if main_process:
            print(f"bit-finetune: error: {error}", file=sys.stderr)
        return 2
    except HubUploadError as error:
        print(f"bit-finetune: error: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if main_process:
            print(
                "bit-finetune: interrupted. A fine-tuning run keeps its last checkpoint in OUTPUT_DIR/checkpoints: "
                "run the same command with --resume to continue it.",
                file=sys.stderr,
            )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
