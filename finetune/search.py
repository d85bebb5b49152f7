"""Random hyper-parameter search over the paper's Appendix A space: `bit-finetune --search N ...` (paper §4.4, Fig. 6).

BiT-HyperRule's claim is that no search is needed; §4.4 measures what a search adds (+4.5 points on VTAB-1k) and
how few trials get close (10-20, Fig. 6). This module runs that search on the fine-tuning engine's pieces through
`transformers.Trainer.hyperparameter_search` with the optuna backend:

- the space (docs/recipe.md "BiT-HyperRule", random search; `APPENDIX_A`): learning rate log-uniform in
  [1e-4, 1e-1]; steps in {500, 1k, 2k, 4k, 8k, 16k}; dropout on the pre-logits uniform in [0, 0.7]; weight decay
  toward the initial weights log-uniform in [1e-6, 1e-1]; MixUp alpha in {none, 0.05, 0.1, 0.2, 0.4}; resolution
  in {64, 128, 192, 256, 320, 384} (the crop; the pre-crop keeps the task's BiT-HyperRule ratio, e.g. 160:128).
  The other rule fields (batch, momentum, warmup and decays as fractions of the steps, augmentation) are the
  task's BiT-HyperRule, with the user's overrides; overrides of the drawn fields (`--max-steps`,
  `--learning-rate`, ...) only shape the BiT-HyperRule reference run, as they would without `--search`. `--search-steps` / `--search-resolutions` replace those two
  sets (for CPU-sized searches; the record and the card say so).
- trial n's settings are drawn by `TrialSeededSampler` from (seed, n) alone, so they do not depend on how many
  processes run the search or on interruptions; every trial trains with the same seed (data order, augmentation).
- selection on a validation split held out of the training data (`--validation-fraction` of each class,
  stratified); the chosen trial is reported on the run's evaluation split, the test split (`--validation-dir`,
  the dataset's validation/test split, or a held-out part of the training set when there is none).
- BiT-HyperRule itself is trained on the same split as the reference (the line in Fig. 6's plot).
- resumable: the study lives in an SQLite file (`O/checkpoints/search.sqlite`, transactional, so a kill never
  tears it); `--resume` keeps the finished trials, reruns the interrupted ones with their settings and runs the
  rest. A trial restarts from its first step (the optuna backend has no mid-trial resume).
- `--search-processes P`: P worker processes (CPU; one intra-op thread each) share the study, trials divided
  among them; the results are the same as with one process. Ray Tune (`backend="ray"`) is transformers' option for
  several machines: `SearchTrainer.hyperparameter_search(backend="ray", ...)` with the same `hp_space`.

The output folder is the chosen trial's fine-tuned folder (model, card, bit_hyperrule.json of its settings, ...)
plus `search_results.json` ({"trials": [{"number", "settings", "eval_accuracy"}, ...], "best_trial",
"test_accuracy", ...}) and `search_curve.png` (Fig. 6: expected best validation accuracy against the number of
trials over 100 random orderings, with its standard error, and BiT-HyperRule's accuracy), embedded in a card
section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import math
import multiprocessing
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PrinterCallback, ProgressCallback

from modeling_bit.file_utils import atomic_directory, atomic_write_bytes, atomic_write_json
from modeling_bit.folder_layout import SEARCH_CURVE_FILE, SEARCH_RESULTS_FILE

from .data import split_off_validation
from .distributed import process_state
from .engine import FinetuneJob, evaluation_inputs, plan, run_finetuning, training_inputs, trial_training_arguments
from .errors import FinetuneInputError
from .hyperrule import BitHyperRule
from .metrics import ClassificationMetrics
from .models import load_model_for_labels
from .output_folder import RUN_FILE_NAME, check_output_dir, write_output_folder
from .preprocessing import ImageBatchCollator, PreprocessedImages, fits_in_memory, preprocess
from .progress import TrialProgress, transformers_quiet
from .trainer import BitTrainer, BitTrainingArguments

logger = logging.getLogger(__name__)


# --- Appendix A's space (docs/recipe.md "BiT-HyperRule": random search) ----------------------------------


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    learning_rate: tuple[float, float] = (1e-4, 1e-1)  # log-uniform
    steps: tuple[int, ...] = (500, 1000, 2000, 4000, 8000, 16000)
    pre_logits_dropout: tuple[float, float] = (0.0, 0.7)  # uniform
    decay_to_initial_weights: tuple[float, float] = (1e-6, 1e-1)  # log-uniform
    mixup_alpha: tuple[float | None, ...] = (None, 0.05, 0.1, 0.2, 0.4)  # None: no MixUp
    resolution: tuple[int, ...] = (64, 128, 192, 256, 320, 384)

    def to_dict(self) -> dict:
        return {
            "learning_rate": {"log_uniform": list(self.learning_rate)},
            "steps": list(self.steps),
            "pre_logits_dropout": {"uniform": list(self.pre_logits_dropout)},
            "decay_to_initial_weights": {"log_uniform": list(self.decay_to_initial_weights)},
            "mixup_alpha": list(self.mixup_alpha),
            "resolution": list(self.resolution),
        }


APPENDIX_A = SearchSpace()
# Orderings of the trials averaged in Fig. 6's curve (paper §4.4).
CURVE_ORDERINGS = 100
STUDY_NAME = "bit-random-search"
STORAGE_FILE = "search.sqlite"
LOCK_FILE = "search.lock"
HYPERRULE_RESULT_FILE = "hyperrule.json"
TRIAL_MODEL = "model"


def hp_space(space: SearchSpace):
    """The optuna `hp_space` for `Trainer.hyperparameter_search`: one draw of `space`."""

    def draw(trial) -> dict:
        return {
            "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
            "steps": trial.suggest_categorical("steps", list(space.steps)),
            "pre_logits_dropout": trial.suggest_float("pre_logits_dropout", *space.pre_logits_dropout),
            "decay_to_initial_weights": trial.suggest_float(
                "decay_to_initial_weights", *space.decay_to_initial_weights, log=True
            ),
            "mixup_alpha": trial.suggest_categorical("mixup_alpha", list(space.mixup_alpha)),
            "resolution": trial.suggest_categorical("resolution", list(space.resolution)),
        }

    return draw


def _sampler(seed: int):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        """Random search whose draws for trial n depend only on (seed, n, parameter name): the same trials whatever
        the number of processes, and a resumed search draws the rest as an uninterrupted one would. The rerun of
        an interrupted trial draws as that trial did (`rerun_of`), so it has its settings even when the kill came
        before all of them were drawn."""

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, name, distribution):
            number = trial.user_attrs.get("rerun_of", trial.number)
            rng = np.random.default_rng((seed, number, zlib.crc32(name.encode())))
            if isinstance(distribution, CategoricalDistribution):
                return distribution.choices[int(rng.integers(len(distribution.choices)))]
            if isinstance(distribution, FloatDistribution):
                if distribution.log:
                    return float(math.exp(rng.uniform(math.log(distribution.low), math.log(distribution.high))))
                return float(rng.uniform(distribution.low, distribution.high))
            if isinstance(distribution, IntDistribution):
                return int(rng.integers(distribution.low, distribution.high + 1))
            raise TypeError(f"TrialSeededSampler draws categorical, float and int distributions, not {distribution}")

    return TrialSeededSampler()


# --- The search job --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchJob:
    """`trials` random trials of `space` for `job` (its data, model, rule overrides, Trainer settings, output)."""

    job: FinetuneJob
    trials: int
    space: SearchSpace = APPENDIX_A
    processes: int = 1
    validation_fraction: float = 0.15

    def __post_init__(self):
        if self.trials < 1:
            raise FinetuneInputError(f"--search {self.trials}: expected at least 1 trial.")
        if self.processes < 1:
            raise FinetuneInputError(f"--search-processes {self.processes}: expected at least 1.")
        for name in ("steps", "resolution"):
            values = getattr(self.space, name)
            if not values or any(int(value) < 1 for value in values):
                raise FinetuneInputError(
                    f"--search-{name.replace('resolution', 'resolutions')}: expected positive numbers."
                )
        if min(self.space.resolution) < 32:
            raise FinetuneInputError(
                f"--search-resolutions {list(self.space.resolution)}: expected at least 32 pixels (BiT downsamples by 32)."
            )
        if self.job.examples_per_class is not None or self.job.trials != 1:
            raise FinetuneInputError("--search runs its own trials: drop --examples-per-class and --trials.")
        if self.job.data.streaming:
            raise FinetuneInputError("--search holds out a validation split of the training set: drop --streaming.")
        if self.processes > 1 and torch.cuda.is_available():
            raise FinetuneInputError(
                "--search-processes > 1 runs trials in forked CPU processes; on an accelerator run one process per "
                "device (or Ray Tune across machines)."
            )
        if process_state().num_processes > 1:
            raise FinetuneInputError("--search runs in one process: start it without torchrun / accelerate launch.")

    @property
    def work_dir(self) -> Path:
        from .output_folder import work_dir_of

        return work_dir_of(self.job.output_dir)

    def signature(self) -> dict:
        """What a --resume must match (the number of trials may grow)."""
        return {**self.job.signature(), "search_space": self.space.to_dict(), "search": True}


@dataclasses.dataclass
class _Splits:
    """Training (without the validation part), validation (selection) and test (report) splits."""

    search_job: FinetuneJob  # the job on (train, validation): the rule, the HyperRule reference
    test: object
    label_names: list[str]
    announcements: list[str]


def _splits(search: SearchJob) -> _Splits:
    job = search.job
    data = job.data
    selection = split_off_validation(dataclasses.replace(data, eval=data.train), search.validation_fraction, job.seed)
    announcement = (
        f"Random search: {search.trials} trial(s) selected on {len(selection.eval)} validation images held out of "
        f"the training set; the chosen trial is reported on the {len(data.eval)} test images."
    )
    selection = dataclasses.replace(selection, announcements=[*data.announcements, announcement])
    search_job = dataclasses.replace(job, data=selection, output_dir=None, save_checkpoints=False, resume=False)
    return _Splits(search_job, data.eval, data.label_names, [])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between the search's processes (fcntl on a lock file)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def trial_rule(base: BitHyperRule, settings: dict) -> BitHyperRule:
    """The task's rule with a trial's steps, learning rate, MixUp and resolution (pre-crop at the rule's ratio)."""
    ratio = base.precrop / base.crop
    crop = int(settings["resolution"])
    # The user's overrides stay (batch, momentum, augmentation, ...) except what the trial draws and what follows
    # from its steps (warmup and decays keep the rule's fractions).
    drawn = {
        "steps",
        "learning_rate",
        "mixup_alpha",
        "precrop",
        "crop",
        "warmup_steps",
        "decay_steps",
        "micro_batch_size",
    }
    overrides = {name: getattr(base, name) for name in base.overrides if name not in drawn}
    return BitHyperRule.from_dataset(
        base.dataset_size,
        base.median_image_area,
        variant=base.variant,
        **{
            **overrides,
            "steps": int(settings["steps"]),
            "learning_rate": float(settings["learning_rate"]),
            "mixup_alpha": float(settings["mixup_alpha"] or 0.0),
            "precrop": max(crop, round(crop * ratio)),
            "crop": crop,
        },
    )


class _Inputs:
    """Training and evaluation datasets per resolution, decoded once when they fit in memory."""

    def __init__(self, job: FinetuneJob):
        self.job = job
        self.train: dict[int, object] = {}
        self.eval: dict[int, object] = {}

    def training(self, rule: BitHyperRule):
        if rule.precrop not in self.train:
            train = self.job.data.train
            if fits_in_memory(len(train), rule.precrop):
                train = preprocess(
                    train, rule.precrop, num_workers=self.job.num_workers, description="Decoding training images"
                )
            self.train = {rule.precrop: train}  # one resolution kept at a time
        return training_inputs(self.train[rule.precrop], rule, seed=self.job.seed, num_workers=self.job.num_workers)

    def evaluation(self, resolution: int, split=None):
        key = (resolution, id(split))
        if key not in self.eval:
            dataset, _ = evaluation_inputs(
                self.job.data.eval if split is None else split, resolution, num_workers=self.job.num_workers
            )
            self.eval = {key: dataset}
        return self.eval[key]


class _SearchTrialProgress(TrialProgress):
    """One bar per trial, named by its number; the trials' lengths differ, so no estimate across them."""

    search_trials = 1

    def _description(self) -> str:
        return f"Trial {self.trial - 1} ({self.trial} of {self.search_trials})"


class SearchTrainer(BitTrainer):
    """A `BitTrainer` whose every `hyperparameter_search` trial runs the task's rule with the trial's settings:
    steps (and so warmup and decays), learning rate, MixUp, resolution (and so the datasets), dropout on the
    pre-logits and weight decay toward the initial weights. `hp_space` returns the App. A names, which are not all
    TrainingArguments fields (resolution, steps), so `_hp_search_setup` builds each trial's arguments itself."""

    def __init__(self, search: SearchJob, job: FinetuneJob, base_rule: BitHyperRule, inputs: _Inputs, **kwargs):
        self.search, self.search_job, self.base_rule, self.inputs = search, job, base_rule, inputs
        self.trial_rule: BitHyperRule | None = None
        work_dir = search.work_dir
        args = trial_training_arguments(job, base_rule, work_dir / "trials", seed=job.seed, in_memory=True)
        super().__init__(
            model_init=lambda: load_model_for_labels(
                job.model, job.data.label_names, from_scratch=job.from_scratch, seed=job.seed, announce=False
            ),
            args=args,
            data_collator=ImageBatchCollator(base_rule.crop),
            compute_metrics=ClassificationMetrics(job.data.label_names),
            **kwargs,
        )
        self.remove_callback(ProgressCallback)
        self.remove_callback(PrinterCallback)
        self.progress = _SearchTrialProgress(1, 1, self.args.device)
        self.progress.search_trials = search.trials
        self.add_callback(self.progress)

    def _hp_search_setup(self, trial) -> None:
        self._trial = trial
        if self.hp_search_backend is None or trial is None:
            return
        settings = self.hp_space(trial)
        state = process_state()
        rule = trial_rule(self.base_rule, settings).for_device(self.model, state.device, state.num_processes)
        args = trial_training_arguments(
            self.search_job, rule, self.search.work_dir / "trials", seed=self.search_job.seed, in_memory=True
        )
        args.pre_logits_dropout = float(settings["pre_logits_dropout"])
        args.decay_to_initial_weights = float(settings["decay_to_initial_weights"])
        # Trainer.train keeps a reference to the arguments object it started with: update it, as the Trainer's own
        # _hp_search_setup does, rather than replacing it.
        for field in dataclasses.fields(args):
            if field.init and getattr(self.args, field.name) != getattr(args, field.name):
                setattr(self.args, field.name, getattr(args, field.name))
        self.trial_rule = rule
        self.train_dataset, unreadable = self.inputs.training(rule)
        self.unreadable_images.update(unreadable)
        self.eval_dataset = self.inputs.evaluation(rule.crop)
        self.data_collator = ImageBatchCollator(rule.crop)
        self.mixup_alpha = rule.mixup_alpha
        self._mixup_counter = (-1, 0)
        self.progress.trial = trial.number + 1
        shown = ", ".join(f"{name} {_shown(value)}" for name, value in settings.items())
        logger.info("Trial %d: %s.", trial.number, shown)
        self._train_batch_size = self.args.train_batch_size
        self.create_accelerator_and_postprocess()

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        trial = getattr(self, "_trial", None)
        if trial is not None and self.hp_search_backend is not None and hasattr(trial, "set_user_attr"):
            self._record_trial(trial, metrics)
        return metrics

    def _record_trial(self, trial, metrics: dict) -> None:
        """Keep the trial's rule, log and, if it may be the best, its model (before optuna marks it complete)."""
        import optuna

        accuracy = float(metrics["eval_accuracy"])
        trial.set_user_attr("rule", self.trial_rule.to_dict())
        trial.set_user_attr("log_history", self.state.log_history)
        trial.set_user_attr(
            "train_metrics",
            {k: v for k, v in self.state.log_history[-1].items() if k.startswith("train")}
            if self.state.log_history
            else {},
        )
        trial.set_user_attr("eval_metrics", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        trial.set_user_attr("unreadable_images", sorted(self.unreadable_images))
        work_dir = self.search.work_dir
        with _locked(work_dir / LOCK_FILE):
            completed = list(trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
            best = max((t.value for t in completed), default=-math.inf)
            if accuracy >= best:
                with (
                    atomic_directory(work_dir / f"trial-{trial.number}" / TRIAL_MODEL) as staging,
                    transformers_quiet(),
                ):
                    self.save_model(str(staging))
            # Models of finished trials below the best finished one are no longer needed (a running trial's better
            # accuracy does not count yet: it may still be interrupted).
            for other in completed:
                folder = work_dir / f"trial-{other.number}"
                if other.value < best and folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)


def _shown(value) -> str:
    if value is None:
        return "none"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --- Running it ------------------------------------------------------------------------------------------


def _open_study(search: SearchJob):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=f"sqlite:///{search.work_dir / STORAGE_FILE}",
        study_name=STUDY_NAME,
        direction="maximize",
        sampler=_sampler(search.job.seed),
        load_if_exists=True,
    )


def _rerun_interrupted(study) -> None:
    """Trials left running by a killed search: failed, and queued again with their settings."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        original = trial.user_attrs.get("rerun_of", trial.number)
        study.enqueue_trial({}, user_attrs={"rerun_of": original})
        logger.info("Trial %d was interrupted: it runs again with its settings.", trial.number)


def _completed(study) -> list:
    import optuna

    return sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number)


def _run_trials(search: SearchJob, job: FinetuneJob, base_rule: BitHyperRule, trials: int) -> None:
    """`trials` trials of the study, in this process."""
    if trials < 1:
        return
    inputs = _Inputs(job)
    trainer = SearchTrainer(search, job, base_rule, inputs)
    with transformers_quiet():
        trainer.hyperparameter_search(
            hp_space=hp_space(search.space),
            compute_objective=lambda metrics: metrics["eval_accuracy"],
            n_trials=trials,
            direction="maximize",
            backend="optuna",
            storage=f"sqlite:///{search.work_dir / STORAGE_FILE}",
            study_name=STUDY_NAME,
            sampler=_sampler(job.seed),
            load_if_exists=True,
        )


_POOL_SEARCH = None  # (search, job, rule), inherited by forked workers


def _worker(trials: int) -> None:
    torch.set_num_threads(1)
    search, job, rule = _POOL_SEARCH
    _run_trials(search, job, rule, trials)


def _run_parallel(search: SearchJob, job: FinetuneJob, base_rule: BitHyperRule, trials: int) -> None:
    global _POOL_SEARCH
    processes = min(search.processes, trials)
    shares = [trials // processes + (index < trials % processes) for index in range(processes)]
    _POOL_SEARCH = (search, job, base_rule)
    try:
        context = multiprocessing.get_context("fork")
        workers = [context.Process(target=_worker, args=(share,)) for share in shares]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [worker.exitcode for worker in workers if worker.exitcode]
        if failed:
            raise RuntimeError(f"{len(failed)} search worker process(es) failed (exit status {failed}).")
    finally:
        _POOL_SEARCH = None


def expected_best_curve(accuracies: Sequence[float], orderings: int = CURVE_ORDERINGS, seed: int = 0) -> list[dict]:
    """Fig. 6: for k = 1..N trials, the best validation accuracy among the first k of a random ordering of the
    trials, averaged over `orderings` orderings, with its standard error."""
    values = np.asarray(accuracies, dtype=np.float64)
    rng = np.random.default_rng(seed)
    bests = np.stack([np.maximum.accumulate(values[rng.permutation(len(values))]) for _ in range(orderings)])
    mean = bests.mean(axis=0)
    error = bests.std(axis=0, ddof=1) / math.sqrt(orderings) if orderings > 1 else np.zeros_like(mean)
    return [
        {"trials": k + 1, "expected_best_eval_accuracy": float(mean[k]), "standard_error": float(error[k])}
        for k in range(len(values))
    ]


def draw_curve(curve: list[dict], hyperrule_accuracy: float | None) -> bytes | None:
    """Fig. 6's plot as PNG bytes (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    trials = [point["trials"] for point in curve]
    mean = np.asarray([point["expected_best_eval_accuracy"] for point in curve])
    error = np.asarray([point["standard_error"] for point in curve])
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    axes.plot(trials, 100 * mean, color="tab:blue", label="random search (expected best)")
    axes.fill_between(
        trials, 100 * (mean - error), 100 * (mean + error), color="tab:blue", alpha=0.25, label="standard error"
    )
    if hyperrule_accuracy is not None:
        axes.axhline(100 * hyperrule_accuracy, color="tab:red", linestyle="--", label="BiT-HyperRule")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("number of random trials")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title(f"Expected best of N trials ({CURVE_ORDERINGS} random orderings)")
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _test_accuracy(
    model_dir: Path, test_dataset, label_names, resolution: int, work_dir: Path, num_workers: int
) -> float:
    """Top-1 accuracy of a saved model on the test split (the Trainer's evaluation, as for validation)."""
    from modeling_bit import BitForImageClassification

    with transformers_quiet(errors_only=True):
        model = BitForImageClassification.from_pretrained(str(model_dir))
    args = BitTrainingArguments(
        output_dir=str(work_dir / "test"),
        per_device_eval_batch_size=64,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0 if isinstance(test_dataset, PreprocessedImages) else num_workers,
    )
    trainer = BitTrainer(
        model,
        args,
        eval_dataset=test_dataset,
        data_collator=ImageBatchCollator(resolution),
        compute_metrics=ClassificationMetrics(label_names),
    )
    trainer.remove_callback(PrinterCallback)  # the search reports the test accuracy itself, as a number
    with transformers_quiet():
        return float(trainer.evaluate()["eval_accuracy"])


def _hyperrule_reference(search: SearchJob, splits: _Splits, inputs: _Inputs) -> dict:
    """BiT-HyperRule on the search's training and validation split, and its test accuracy (cached for --resume)."""
    path = search.work_dir / HYPERRULE_RESULT_FILE
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
    job = dataclasses.replace(
        splits.search_job, work_dir=search.work_dir / "hyperrule", save_checkpoints=False, quiet=True
    )
    logger.info("BiT-HyperRule reference run on the same split.")
    result = run_finetuning(job)
    test = inputs.evaluation(result.rule.crop, splits.test)
    reference = {
        "eval_accuracy": result.accuracy,
        "test_accuracy": _test_accuracy(
            result.saved_model_dir(), test, splits.label_names, result.rule.crop, search.work_dir, job.num_workers
        ),
        "rule": result.rule.to_dict(),
    }
    shutil.rmtree(search.work_dir / "hyperrule", ignore_errors=True)
    atomic_write_json(path, reference)
    return reference


@dataclasses.dataclass
class SearchResult:
    results: dict  # search_results.json
    folder: Path


def run_search(search: SearchJob) -> SearchResult:
    """Run (or continue) the search and write its output folder; see the module docstring."""
    try:
        import optuna  # noqa: F401
    except ImportError as error:
        raise FinetuneInputError("--search needs optuna: pip install optuna (or bit-transfer[search]).") from error
    job = search.job
    resuming = check_output_dir(
        job.output_dir, resume=job.resume, overwrite=job.overwrite_output_dir, signature=search.signature()
    )
    splits = _splits(search)
    search_job = splits.search_job
    planned = plan(search_job)  # checks the data and the model; the task's rule on this device
    base_rule = planned.rule
    work_dir = search.work_dir
    if not resuming:
        if work_dir.exists():
            shutil.rmtree(work_dir)
        atomic_write_json(work_dir / RUN_FILE_NAME, search.signature())
    started = time.perf_counter()
    inputs = _Inputs(search_job)
    reference = _hyperrule_reference(search, splits, inputs)
    logger.info(
        "BiT-HyperRule: validation accuracy %.4f, test accuracy %.4f.",
        reference["eval_accuracy"],
        reference["test_accuracy"],
    )

    study = _open_study(search)
    _rerun_interrupted(study)
    done = len(_completed(study))
    remaining = search.trials - done
    if done:
        logger.info("%d of %d trial(s) already finished.", min(done, search.trials), search.trials)
    if remaining > 0:
        if search.processes > 1 and remaining > 1:
            _run_parallel(search, search_job, base_rule, remaining)
        else:
            _run_trials(search, search_job, base_rule, remaining)
    completed = _completed(_open_study(search))
    if not completed:
        raise FinetuneInputError("No trial of the search finished.")
    best = max(completed, key=lambda trial: (trial.value, -trial.number))
    model_dir = work_dir / f"trial-{best.number}" / TRIAL_MODEL
    recorded = best.user_attrs["rule"]
    best_rule = trial_rule(base_rule, best.params).with_micro_batch_size(
        recorded["micro_batch_size"], recorded.get("processes", 1)
    )
    test = inputs.evaluation(best_rule.crop, splits.test)
    test_accuracy = _test_accuracy(
        model_dir, test, splits.label_names, best_rule.crop, work_dir, search_job.num_workers
    )
    trials = [{"number": t.number, "settings": dict(t.params), "eval_accuracy": float(t.value)} for t in completed]
    curve = expected_best_curve([t["eval_accuracy"] for t in trials])
    results = {
        "trials": trials,
        "best_trial": best.number,
        "test_accuracy": test_accuracy,
        "eval_accuracy": float(best.value),
        "hyperrule": reference,
        "search_space": search.space.to_dict(),
        "search_space_is_appendix_a": search.space == APPENDIX_A,
        "selection": {"split": "validation (held out of the training set)", "examples": len(search_job.data.eval)},
        "test": {"examples": len(test)},
        "expected_best_curve": curve,
        "expected_best_orderings": CURVE_ORDERINGS,
        "seconds": round(time.perf_counter() - started, 1),
    }
    folder = _write_folder(search, best, best_rule, model_dir, results, reference, curve)
    logger.info(
        "Best of %d trials: trial %d, validation accuracy %.4f, test accuracy %.4f (BiT-HyperRule: %.4f / %.4f).",
        len(trials),
        best.number,
        best.value,
        test_accuracy,
        reference["eval_accuracy"],
        reference["test_accuracy"],
    )
    logger.info("Saved the best trial's fine-tuned model in %s", folder)
    return SearchResult(results, folder)


def _write_folder(
    search: SearchJob, best, rule: BitHyperRule, model_dir: Path, results: dict, reference: dict, curve
) -> Path:
    """The chosen trial's fine-tuned folder with the search's record, plot and card section, atomically."""
    from model_cards import write_model_card

    job = search.job
    output_dir = Path(job.output_dir)
    eval_metrics = dict(best.user_attrs.get("eval_metrics", {}))
    eval_results = {**eval_metrics, "eval_accuracy": float(best.value), "test_accuracy": results["test_accuracy"]}
    all_results = {
        **best.user_attrs.get("train_metrics", {}),
        **eval_results,
        "search_trials": len(results["trials"]),
        "search_best_trial": best.number,
        "hyperrule_eval_accuracy": reference["eval_accuracy"],
        "hyperrule_test_accuracy": reference["test_accuracy"],
    }
    finetune_args = {
        "command": list(job.command),
        "model": str(job.model),
        "model_is_local_folder": Path(job.model).is_dir(),
        "dataset": {**job.data.source, "num_classes": job.data.num_classes},
        "from_scratch": job.from_scratch,
        "unreadable_images": best.user_attrs.get("unreadable_images", []),
        "search": {"trials": len(results["trials"]), "best_trial": best.number, "settings": dict(best.params)},
    }
    with atomic_directory(output_dir) as staging:
        write_output_folder(
            staging,
            model_dir,
            rule,
            eval_results=eval_results,
            all_results=all_results,
            finetune_args=finetune_args,
            log_history=best.user_attrs.get("log_history", []),
        )
        atomic_write_json(staging / SEARCH_RESULTS_FILE, results)
        plot = draw_curve(curve, reference["eval_accuracy"])
        if plot is not None:
            atomic_write_bytes(staging / SEARCH_CURVE_FILE, plot)
        # The card reads search_results.json: its search section comes back whenever the card is rendered again.
        write_model_card(staging, folder_name=output_dir.absolute().name)
    return output_dir


__all__ = [
    "APPENDIX_A",
    "SearchJob",
    "SearchResult",
    "SearchSpace",
    "SearchTrainer",
    "expected_best_curve",
    "run_search",
]
