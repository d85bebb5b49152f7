"""Build a model card for a saved BiT folder: Hub metadata (ModelCardData, EvalResult) and the templated text.

The metadata is built with huggingface_hub's `ModelCardData` and `EvalResult` (never hand-written YAML), and every
id that goes into it is checked first: metric ids against the ones this card reports, dataset ids and model ids
against the Hub's repository-id grammar. The text is Jinja's: `templates/model_card.md.j2` lays out every card and
one template per folder kind (`converted`, `fine-tuned`, `pretrained`, `plain`) writes its prose. This module
computes the values they show (names, numbers, tables, metadata, links), so that a template never meets a missing
one.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from modeling_bit import labels as label_lists
from modeling_bit.folder_layout import (
    CONFIG_FILE,
    CONVERSION_FILE,
    FINETUNE_ARGS_FILE,
    HYPERRULE_FILE,
    PREPROCESSOR_FILE,
    PRETRAINING_FILE,
    SEARCH_CURVE_FILE,
    SEARCH_RESULTS_FILE,
)
from modeling_bit.published import find_published_checkpoint

from .examples import ExampleImage
from .facts import CardError, FolderFacts, FolderKind
from .plots import Plot
from .results import (
    evaluation_metrics,
    few_shot_trials,
    final_probe_results,
    finite,
)

# The template of each folder kind; each extends model_card.md.j2.
KIND_TEMPLATES = {
    FolderKind.CONVERTED: "converted.md.j2",
    FolderKind.FINE_TUNED: "fine-tuned.md.j2",
    FolderKind.PRETRAINED: "pretrained.md.j2",
    FolderKind.SAVED: "plain.md.j2",
}
TASK = "image-classification"
TASK_NAME = "Image Classification"
# Metric ids (https://hf.co/metrics) these cards report; anything else is refused before writing.
HUB_METRIC_IDS = frozenset({"accuracy"})
# Dataset loaders a model-index may name instead of a Hub dataset (HF Trainer writes "imagefolder" for local
# image folders, which `datasets.load_dataset("imagefolder", data_dir=...)` reads).
PACKAGED_DATASET_LOADERS = frozenset({"imagefolder"})
# Dataset names our producers record that are not Hub datasets: bit-finetune's main job trains on scikit-learn's
# digits (finetune/main_job.py).
NON_HUB_DATASETS = {"sklearn.datasets.load_digits": "scikit-learn's digits (`sklearn.datasets.load_digits`)"}
# The split name a model-index gives an evaluation when the producer did not record one: both producers evaluate on
# their run's validation data (the dataset's validation split or examples held out of training).
VALIDATION_SPLIT = "validation"
BASE_TAGS = ("bit", "big-transfer", "resnetv2", "image-classification", "vision", "bit-transfer")
LICENSE_PATTERN = re.compile(r"[a-z0-9][a-z0-9.+-]*")
# The licence the BiT authors released their checkpoints under (github.com/google-research/big_transfer, LICENSE).
PUBLISHED_WEIGHTS_LICENSE = "apache-2.0"

BIT_PAPER = "[the BiT paper](https://arxiv.org/abs/1912.11370)"
BIBTEX = """@inproceedings{kolesnikov2020bit,
  title     = {Big Transfer ({BiT}): General Visual Representation Learning},
  author    = {Kolesnikov, Alexander and Beyer, Lucas and Zhai, Xiaohua and Puigcerver, Joan and
               Yung, Jessica and Gelly, Sylvain and Houlsby, Neil},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2020},
  eprint    = {1912.11370},
  archivePrefix = {arXiv}
}"""


@dataclass(frozen=True)
class UpstreamDataset:
    hub_id: str  # as the Hub's dataset tags and timm's BiT cards name it
    display: str
    size: str  # BiT paper §3.1


UPSTREAM_DATASETS = {
    label_lists.IMAGENET21K: UpstreamDataset("imagenet-21k", "ImageNet-21k", "14.2M images, 21,843 classes"),
    label_lists.ILSVRC2012: UpstreamDataset("imagenet-1k", "ILSVRC-2012", "ImageNet-1k: 1.28M images, 1,000 classes"),
}


@dataclass(frozen=True)
class CardOptions:
    """What the folder cannot know: where it will live on the Hub, and choices only its owner can make."""

    repo_id: str | None = None  # "namespace/name": Hub URLs in the widget and the usage code
    license: str | None = None  # a Hub licence id; published BiT weights default to apache-2.0
    base_model: str | None = None  # Hub id of the model this one derives from
    folder_name: str | None = None  # the folder's name once in place, for a card written into a staging folder


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str = ""


# --- checks ------------------------------------------------------------------------------------------------


def check_repo_id(repo_id: str, what: str, *, namespaced: bool = False) -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise CardError(f"{what} {repo_id!r} is not a Hub repository id: {error}") from error
    if namespaced and "/" not in repo_id:
        raise CardError(f"{what} {repo_id!r} needs a namespace: 'your-name/{repo_id}'.")
    return repo_id


def check_license(license_id: str) -> str:
    if not LICENSE_PATTERN.fullmatch(license_id) or license_id == "other":
        raise CardError(
            f"license {license_id!r}: expected a Hub licence id such as 'apache-2.0', 'mit' or 'cc-by-4.0' "
            "(https://huggingface.co/docs/hub/repositories-licenses)."
        )
    return license_id


def valid_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def looks_like_path(name: str) -> bool:
    """Whether a recorded dataset or model name is spelled as a file-system path (the text alone decides)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or re.match(r"[A-Za-z]:", name) is not None


def hub_dataset_id(name: str) -> str | None:
    """`name` as a Hub dataset id, or None when it names local data.

    Decided from the recorded text alone, never from what exists in the current directory: a path spelling, a
    name the Hub's id grammar refuses, or a non-Hub source our producers record is local data.
    """
    if name in NON_HUB_DATASETS or looks_like_path(name) or not valid_repo_id(name):
        return None
    return name


def checked_eval_result(*, dataset_type: str, metric_type: str, metric_value: float, **fields) -> EvalResult:
    """An `EvalResult` for image classification, refused unless its metric and dataset ids are valid."""
    if metric_type not in HUB_METRIC_IDS:
        raise CardError(f"metric {metric_type!r} is not one of the Hub metric ids {sorted(HUB_METRIC_IDS)}.")
    if dataset_type not in PACKAGED_DATASET_LOADERS and hub_dataset_id(dataset_type) is None:
        raise CardError(
            f"dataset {dataset_type!r} is neither a Hub dataset id nor one of {sorted(PACKAGED_DATASET_LOADERS)}."
        )
    if not finite(metric_value) or not 0 <= metric_value <= 1:
        raise CardError(f"{metric_type} = {metric_value!r} on {dataset_type}: expected a fraction in [0, 1].")
    return EvalResult(
        task_type=TASK,
        task_name=TASK_NAME,
        dataset_type=dataset_type,
        metric_type=metric_type,
        metric_value=float(metric_value),
        **fields,
    )


# --- formatting --------------------------------------------------------------------------------------------


def _count(value: int) -> str:
    return f"{value:,}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _code(text) -> str:
    return f"`{str(text).replace('`', '')}`"


def _value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return _count(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return public_path(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(item) for item in value) if value else "none"
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_value(item)}" for key, item in value.items() if item is not None)
    return str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(headers, rows, **kwargs) -> Table | None:
    rows = [[_cell(cell) for cell in row] for row in rows]
    return Table([_cell(header) for header in headers], rows, **kwargs) if rows else None


def _record_table(record: dict, labels: dict[str, str], title: str) -> Table | None:
    """A metadata record as a two-column table, in the record's order, without empty values."""
    rows = [
        [labels.get(key, _code(key)), _value(value)]
        for key, value in record.items()
        if value is not None and value != "" and value != [] and value != {}
    ]
    return _table(["", "value"], rows, title=title)


# The drawn settings of a random-search trial (finetune/search.py), as the card's trial table shows them.
SEARCH_SETTING_COLUMNS = {
    "learning_rate": "learning rate",
    "steps": "steps",
    "pre_logits_dropout": "dropout",
    "decay_to_initial_weights": "decay to initial",
    "mixup_alpha": "MixUp α",
    "resolution": "resolution",
}


@dataclass(frozen=True)
class SearchSummary:
    """What a random search's best-trial folder records about the search (`search_results.json`)."""

    trials: int
    best_trial: int
    appendix_a: bool
    selection_examples: int | None
    test_examples: int | None
    test_accuracy: float | None
    eval_accuracy: float | None
    hyperrule_test_accuracy: float | None
    hyperrule_eval_accuracy: float | None
    table: Table | None
    curve_file: str | None  # the Fig. 6 plot, when the folder has it
    orderings: int | None


def _search_setting(value) -> str:
    if value is None:
        return "none"
    return f"{value:.2g}" if isinstance(value, float) else _value(value)


def search_summary(facts: FolderFacts) -> SearchSummary | None:
    record = facts.search_results
    if record is None:
        return None
    trials = [trial for trial in record.get("trials") or [] if isinstance(trial.get("settings"), dict)]
    best = record.get("best_trial")
    rows = [
        [
            f"{trial.get('number')}{' (chosen)' if trial.get('number') == best else ''}",
            *(_search_setting(trial["settings"].get(key)) for key in SEARCH_SETTING_COLUMNS),
            _percent(trial["eval_accuracy"]) if finite(trial.get("eval_accuracy")) else "",
        ]
        for trial in trials
    ]
    hyperrule = record.get("hyperrule") or {}

    def fraction(value) -> float | None:
        return float(value) if finite(value) else None

    def count(value) -> int | None:
        return int(value) if finite(value) else None

    return SearchSummary(
        trials=len(record.get("trials") or []),
        best_trial=best,
        appendix_a=bool(record.get("search_space_is_appendix_a")),
        selection_examples=count((record.get("selection") or {}).get("examples")),
        test_examples=count((record.get("test") or {}).get("examples")),
        test_accuracy=fraction(record.get("test_accuracy")),
        eval_accuracy=fraction(record.get("eval_accuracy")),
        hyperrule_test_accuracy=fraction(hyperrule.get("test_accuracy")),
        hyperrule_eval_accuracy=fraction(hyperrule.get("eval_accuracy")),
        table=_table(["trial", *SEARCH_SETTING_COLUMNS.values(), "validation accuracy"], rows),
        curve_file=SEARCH_CURVE_FILE if (facts.folder / SEARCH_CURVE_FILE).is_file() else None,
        orderings=count(record.get("expected_best_orderings")),
    )


# --- the card --------------------------------------------------------------------------------------------------


def shell_command(argv: list) -> str:
    """A recorded command as a shell line, with absolute paths shortened (see `public_path`)."""
    return shlex.join(public_argument(str(part)) for part in argv)


# How pre-training is run (pretraining/pretrain.py's docstring): the script by its path in the repository, under
# accelerate's launcher; `bit-pretrain` is its console script.
PRETRAIN_SCRIPT = "pretraining/pretrain.py"
PRETRAIN_CONSOLE_SCRIPT = "bit-pretrain"


def pretraining_command(argv: list, num_processes, launcher: list | None = None) -> list[str]:
    """Pre-training's recorded `sys.argv` as the user reruns it: `sys.argv[0]` is the script's path as Python saw it
    (absolute under `python -m` or `accelerate launch`), so the launcher and the repository path are put back.

    `launcher` is the launcher line the run recorded (`bit_pretraining.json`, `launch.launcher`: one that really
    starts the recorded number of processes); folders written before it was recorded get accelerate's, with
    `--multi_gpu`, without which `accelerate launch --num_processes N` runs one process on a CPU machine.
    Empty when the recorded program is neither (pre-training started from other Python code records that program's
    argv, which would not rerun anything)."""
    program = Path(str(argv[0])).name if argv else ""
    if program not in ("pretrain.py", PRETRAIN_CONSOLE_SCRIPT):
        return []
    arguments = [str(part) for part in argv[1:]]
    processes = int(num_processes) if finite(num_processes) and num_processes > 1 else 1
    if program == PRETRAIN_CONSOLE_SCRIPT and processes == 1 and not launcher:
        return [PRETRAIN_CONSOLE_SCRIPT, *arguments]
    if not launcher:
        launcher = [
            "accelerate",
            "launch",
            *(["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else []),
        ]
    return [*(str(part) for part in launcher), PRETRAIN_SCRIPT, *arguments]


@dataclass(frozen=True)
class DatasetReference:
    """A dataset as a card names it: for text, for `datasets:` metadata and for the model-index."""

    display: str  # Markdown, for the card's text
    name: str  # plain, for the model-index
    short: str  # plain, for a title: "hymenoptera"
    hub_id: str | None = None  # a Hub dataset id, for `datasets:`
    index_type: str | None = None  # what the model-index names (a Hub id, or "imagefolder"); None: unnameable
    config: str | None = None
    split: str = VALIDATION_SPLIT  # what evaluation used: always data held out of training


SPLIT_FOLDER_NAMES = frozenset({"train", "training", "trn", "val", "valid", "validation", "test"})


def public_path(text: str) -> str:
    """A path as a card shows it: an absolute path (which would publish the producer's file system) shortened to its
    last component, or its last two when the last is a split name (`.../hymenoptera/train` → `hymenoptera/train`)."""
    if not (text.startswith("/") or re.match(r"[A-Za-z]:[\\/]", text)):
        return text
    parts = [part for part in re.split(r"[\\/]+", text) if part]
    if not parts:
        return text
    return "/".join(parts[-2:]) if parts[-1].lower() in SPLIT_FOLDER_NAMES and len(parts) > 1 else parts[-1]


def public_argument(argument: str) -> str:
    """A command-line argument with any absolute path in it shortened (`--train-dir=/x/y` included)."""
    if argument.startswith("-") and "=" in argument:
        flag, value = argument.split("=", 1)
        return f"{flag}={public_path(value)}"
    return public_path(argument)


def _split_folder_name(path: str) -> str:
    """A readable name for an image folder: `data/hymenoptera/train` reads as "hymenoptera"."""
    parts = [part for part in re.split(r"[\\/]+", path) if part and part != "."]
    if len(parts) > 1 and parts[-1].lower() in SPLIT_FOLDER_NAMES:
        return parts[-2]
    return parts[-1] if parts else path


def dataset_reference(record: dict) -> DatasetReference | None:
    """The `dataset` record of bit_finetune_args.json or bit_pretraining.json as a reference.

    What the producer recorded decides: `train_dir` is a local image folder (named in prose and in the model-index
    as `imagefolder`, never as a Hub dataset); `name` is a Hub dataset id when it is spelled as one, else local data
    named in prose only. Evaluation is on the recorded validation split, else on the run's held-out examples.
    """
    recorded_split = record.get("validation_split")
    split = recorded_split if isinstance(recorded_split, str) and recorded_split else VALIDATION_SPLIT
    if isinstance(record.get("train_dir"), str) and record["train_dir"]:
        folder = _split_folder_name(record["train_dir"])
        return DatasetReference(
            display=f"the local image folder {_code(folder)}",
            name=f"{folder} (image folder)",
            short=folder,
            index_type="imagefolder",
            split=split,
        )
    name = record.get("name")
    if not isinstance(name, str) or not name:
        return None
    config = record.get("config") if isinstance(record.get("config"), str) else None
    configured = f" (configuration {_code(config)})" if config else ""
    hub_id = hub_dataset_id(name)
    if hub_id is not None:
        return DatasetReference(
            display=f"the Hub dataset {_code(hub_id)}{configured}",
            name=hub_id,
            short=hub_id,
            hub_id=hub_id,
            index_type=hub_id,
            config=config,
            split=split,
        )
    if name in NON_HUB_DATASETS:
        return DatasetReference(display=NON_HUB_DATASETS[name], name=name, short=name, split=split)
    local = _split_folder_name(name)
    return DatasetReference(
        display=f"the local dataset {_code(local)}{configured}", name=local, short=local, config=config, split=split
    )


class _CardValues:
    """Every value a card shows, computed from the folder's records and the caller's options (no prose)."""

    def __init__(self, facts: FolderFacts, plots: list[Plot], examples: list[ExampleImage], options: CardOptions):
        self.facts, self.plots, self.examples, self.options = facts, plots, examples, options
        self.kind = facts.kind.value
        self.conversion = facts.conversion or {}
        self.published = (
            find_published_checkpoint(self.conversion["published_name"])
            if self.conversion.get("published_name")
            else None
        )
        self.trials = few_shot_trials(facts)
        self.search = search_summary(facts)
        if facts.kind is FolderKind.PRETRAINED:
            self.dataset_record = (facts.pretraining or {}).get("dataset") or {}
        else:
            self.dataset_record = (facts.finetune_args or {}).get("dataset") or {}
        self.dataset = dataset_reference(self.dataset_record)
        k = self.dataset_record.get("examples_per_class") if facts.kind is FolderKind.FINE_TUNED else None
        self.examples_per_class = int(k) if finite(k) and k > 0 else None
        self.finetune_args = facts.finetune_args or {}
        self.pretraining = facts.pretraining or {}
        model = self.finetune_args.get("model")
        self.start_model = public_path(model) if isinstance(model, str) and model else None
        self.from_scratch = bool(self.finetune_args.get("from_scratch"))
        self.title = self.default_title()
        self.model_reference = options.repo_id or self.folder_name
        self.architecture = facts.architecture
        self.preprocessing = facts.preprocessing
        self.multi_label = facts.multi_label
        self.pretraining_multi_label = bool(self.dataset_record.get("multi_label")) if self.pretraining else False
        self.network = self.network_name()
        self.bibtex = BIBTEX
        self.bit_paper = BIT_PAPER

    def default_title(self) -> str:
        """The repository's name; else the published name; else what the folder holds, not its folder name when
        that names a step of a producer (pre-training's `O/final`)."""
        if self.options.repo_id:
            return self.options.repo_id.split("/")[-1]
        if self.published and self.facts.kind is FolderKind.CONVERTED:
            return self.published.name
        architecture = self.facts.architecture
        network = architecture.preset_name or (
            f"BiT-{architecture.standard_name}" if architecture.standard_name else "BiT"
        )
        if self.facts.kind is FolderKind.PRETRAINED and self.dataset:
            return f"{network} pre-trained on {self.dataset.short}"
        parent = self.facts.folder.resolve().parent.name  # a staging folder is a sibling of its target
        return parent if self.folder_name == "final" and parent else self.folder_name

    @property
    def folder_name(self) -> str:
        return self.options.folder_name or self.facts.folder.resolve().name

    # metadata ------------------------------------------------------------------------------------------------

    def license(self) -> str | None:
        if self.options.license:
            return check_license(self.options.license)
        return PUBLISHED_WEIGHTS_LICENSE if self.published else None

    def base_model(self) -> str | None:
        if self.options.base_model:
            return check_repo_id(self.options.base_model, "base model")
        args = self.finetune_args
        model = str(args.get("model") or "")
        # Only a namespaced Hub id is known to be a Hub model: a bare name is a published BiT name or a
        # preset, and a path is a local folder (bit-finetune records whether it was one).
        if args.get("model_is_local_folder") is True:
            return None
        if (
            self.facts.kind is FolderKind.FINE_TUNED
            and not self.from_scratch
            and "/" in model
            and not looks_like_path(model)
            and valid_repo_id(model)
            and find_published_checkpoint(model) is None
        ):
            return model
        return None

    def datasets(self) -> list[str]:
        ids = []
        for key in ("upstream_dataset", "fine_tuned_on"):
            known = UPSTREAM_DATASETS.get(self.conversion.get(key))
            if self.facts.kind is FolderKind.CONVERTED and known:
                ids.append(known.hub_id)
        if self.dataset and self.dataset.hub_id:
            ids.append(self.dataset.hub_id)
        return list(dict.fromkeys(ids))

    def tags(self) -> list[str]:
        tags = list(BASE_TAGS)
        if self.examples_per_class:
            tags.append("few-shot")
        if self.multi_label or self.pretraining_multi_label:
            tags.append("multi-label")
        return tags

    def eval_results(self) -> list[EvalResult]:
        reference = self.dataset
        if reference is None or reference.index_type is None:
            return []  # local data the Hub cannot name: the results are in the text only
        common = {
            "dataset_type": reference.index_type,
            "dataset_name": reference.name,
            "dataset_config": reference.config,
            "dataset_split": reference.split,
        }
        results = []
        if self.facts.kind is FolderKind.FINE_TUNED:
            names = {"accuracy": self.accuracy_label(), "top_5_accuracy": "Top-5 accuracy"}
            for metric in evaluation_metrics(self.facts):
                if metric.name in names:
                    results.append(
                        checked_eval_result(
                            metric_type="accuracy", metric_value=metric.value, metric_name=names[metric.name], **common
                        )
                    )
        elif self.facts.kind is FolderKind.PRETRAINED:
            for entry in final_probe_results(self.facts):
                results.append(
                    checked_eval_result(
                        metric_type="accuracy",
                        metric_value=entry["accuracy"],
                        metric_name=self.probe_label(entry),
                        **common,
                    )
                )
        return results

    def widget(self) -> list[dict] | None:
        if not (self.options.repo_id and self.examples):
            return None
        return [{"src": self.example_url(example), "example_title": example.title} for example in self.examples]

    def example_url(self, example: ExampleImage) -> str:
        return f"{constants.ENDPOINT}/{self.options.repo_id}/resolve/main/{example.file}"

    def card_data(self) -> ModelCardData:
        eval_results = self.eval_results()
        return ModelCardData(
            library_name="transformers",
            pipeline_tag=TASK,
            license=self.license(),
            base_model=self.base_model(),
            datasets=self.datasets() or None,
            tags=self.tags(),
            metrics=["accuracy"] if eval_results else None,
            model_name=self.title if eval_results else None,
            eval_results=eval_results or None,
            widget=self.widget(),
        )

    # names -----------------------------------------------------------------------------------------------------

    def accuracy_label(self) -> str:
        if self.search is not None:
            return (
                f"Accuracy (the best of {self.search.trials} random-search trials, chosen on held-out training images)"
            )
        if self.trials is not None:
            shots = f", {self.trials.examples_per_class} examples per class" if self.trials.examples_per_class else ""
            return f"Accuracy (median of {len(self.trials.accuracies)} fine-tuning trials{shots})"
        return "Accuracy"

    @staticmethod
    def probe_label(entry: dict) -> str:
        trials = f", median of {entry['trials']} trials" if finite(entry.get("trials")) else ""
        return f"{entry['examples_per_class']}-shot linear-probe accuracy (held-out images{trials})"

    def network_name(self) -> str:
        architecture = self.facts.architecture
        if architecture.standard_name:
            return f"ResNet-v2 {architecture.standard_name}"
        if architecture.preset_name:
            return f"`{architecture.preset_name}` ResNet-v2"
        return "ResNet-v2"

    def upstream_data(self, key: str) -> UpstreamDataset | None:
        """A converted folder's upstream (`upstream_dataset`) or fine-tuning (`fine_tuned_on`) data, if known."""
        return UPSTREAM_DATASETS.get(self.conversion.get(key))

    def dataset_named(self, dataset: str) -> UpstreamDataset:
        return UPSTREAM_DATASETS[dataset]

    @property
    def conversion_source(self) -> str | None:
        """The source a conversion recorded, as the card may show it."""
        source = self.conversion.get("source")
        return public_path(source) if isinstance(source, str) and source else None

    @property
    def conversion_source_kind(self) -> str | None:
        kind = self.conversion.get("source_kind")
        return kind if isinstance(kind, str) else None

    @property
    def published_file_name(self) -> str | None:
        return Path(self.published.file).name if self.published else None

    @property
    def head_replaced(self) -> bool:
        return self.conversion.get("head") == "replaced"

    @property
    def producer_version(self) -> str | None:
        """The bit-transfer version the producer recorded (conversion or pre-training)."""
        record = self.conversion if self.facts.kind is FolderKind.CONVERTED else self.pretraining
        return record.get("bit_transfer_version") or None

    @property
    def unreadable_images(self) -> int | float | None:
        unreadable = (self.facts.all_results or {}).get("unreadable_images")
        return unreadable if finite(unreadable) and unreadable > 0 else None

    def counted(self, record: dict, key: str) -> int | None:
        """`record[key]` when it is a recorded number, for the text to count."""
        return record[key] if finite(record.get(key)) else None

    @property
    def final_loss(self) -> float | None:
        return self.pretraining["final_loss"] if finite(self.pretraining.get("final_loss")) else None

    @property
    def differences_from_paper(self) -> list:
        return self.pretraining.get("differences_from_paper") or []

    @property
    def probed(self) -> bool:
        return bool(final_probe_results(self.facts))

    # tables ----------------------------------------------------------------------------------------------------

    def architecture_table(self) -> Table:
        a = self.facts.architecture
        rows = [
            [
                "Network",
                f"{self.network}: pre-activation bottleneck units, Group Normalization and "
                "Weight Standardization (BiT)",
            ]
        ]
        rows.append(["Depth", f"{a.layers} layers; {len(a.depths)} stages of {', '.join(map(str, a.depths))} units"])
        width = a.standard_name.split("x")[1] if a.standard_name else None
        rows.append(
            [
                "Width",
                (f"×{width}; " if width else "")
                + f"stem {a.stem_channels} channels, stage outputs {', '.join(map(str, a.stage_channels))} channels",
            ]
        )
        if a.num_groups:
            rows.append(["Group Normalization", f"{a.num_groups} groups"])
        if a.parameters is not None:
            head = (
                f" (backbone {_count(a.parameters - a.head_parameters)} + head {_count(a.head_parameters)})"
                if a.head_parameters
                else ""
            )
            rows.append(["Parameters", f"{_count(a.parameters)}{head}"])
        rows.append(["Classes", f"{_count(a.num_labels)}; names in `{CONFIG_FILE}` → `id2label`{self.label_source()}"])
        if self.multi_label:
            rows.append(["Output", "independent per-class probabilities (sigmoid; multi-label)"])
        if self.preprocessing:
            rows.append(["Input resolution", self.preprocessing.resolution])
        if a.weights_dtype:
            rows.append(["Weights", f"{a.weights_dtype}, safetensors"])
        return _table(["", ""], rows)

    def label_source(self) -> str:
        if self.conversion.get("head") == "published":
            dataset = label_lists.dataset_of_head(self.facts.architecture.num_labels)
            if dataset:
                return f" (WordNet synsets of {UPSTREAM_DATASETS[dataset].display}, first lemma)"
        return ""

    def production_tables(self) -> list[Table]:
        kind = self.facts.kind
        if kind is FolderKind.CONVERTED:
            tables = [_record_table(self.conversion, CONVERSION_LABELS, f"Conversion record (`{CONVERSION_FILE}`)")]
        elif kind is FolderKind.FINE_TUNED:
            tables = [self.hyperrule_table()]
        elif kind is FolderKind.PRETRAINED:
            recipe = self.pretraining.get("recipe") or {}
            tables = [_record_table(recipe, {}, f"Recipe record (`{PRETRAINING_FILE}` → `recipe`)")]
        else:
            tables = []
        return [table for table in tables if table]

    def hyperrule_table(self) -> Table | None:
        rule = self.facts.hyperrule or {}
        if not rule:
            return None
        overrides = set(rule.get("overrides") or [])
        rows = [
            [
                HYPERRULE_LABELS.get(key, _code(key)),
                _value(value),
                "given"
                if key in overrides
                else ("chosen for the device" if key == "micro_batch_size" else "BiT-HyperRule"),
            ]
            for key, value in rule.items()
            if key != "overrides" and value is not None
        ]
        return _table(["setting", "value", "from"], rows, title=f"BiT-HyperRule record (`{HYPERRULE_FILE}`)")

    @property
    def command(self) -> str:
        """The recorded command as the user reruns it; empty when there is none to show."""
        if self.facts.kind is FolderKind.FINE_TUNED:
            return shell_command(self.finetune_args.get("command") or [])
        if self.facts.kind is FolderKind.PRETRAINED:
            argv = self.pretraining.get("command") or []
            launcher = (self.pretraining.get("launch") or {}).get("launcher")
            return shell_command(pretraining_command(argv, self.pretraining.get("num_processes"), launcher))
        return ""

    def results_tables(self) -> list[Table]:
        facts, tables = self.facts, []
        if facts.kind is FolderKind.FINE_TUNED:
            metrics = evaluation_metrics(facts)
            labels = {"accuracy": self.accuracy_label(), "top_5_accuracy": "Top-5 accuracy", "loss": "Loss"}
            rows = [[labels[m.name], _percent(m.value) if m.name != "loss" else f"{m.value:.4f}"] for m in metrics]
            if rows and finite(self.dataset_record.get("num_eval_examples")):
                rows.append(["Evaluated images", _count(self.dataset_record["num_eval_examples"])])
            tables.append(_table(["metric", "value"], rows, title=f"Evaluation on {self.evaluation_data()}"))
            if self.trials is not None:
                t = self.trials
                row = [
                    self.trial_examples_per_class(),
                    str(len(t.accuracies)),
                    *map(_percent, (t.median, t.minimum, t.maximum)),
                ]
                tables.append(
                    _table(
                        ["examples per class", "trials", "median", "min", "max"],
                        [row],
                        title="Accuracy over trials (the paper's few-shot protocol: median over random draws)",
                    )
                )
                tables.append(
                    _table(
                        ["trial", "accuracy", "weights in this folder"],
                        [
                            [str(i + 1), _percent(a), "yes" if i == t.saved_trial else ""]
                            for i, a in enumerate(t.accuracies)
                        ],
                    )
                )
        elif facts.kind is FolderKind.PRETRAINED:
            entries = final_probe_results(facts)
            if entries:
                rows = [
                    [
                        str(e["examples_per_class"]),
                        _percent(e["accuracy"]),
                        _value(e["trials"]) if finite(e.get("trials")) else "",
                        _count(e["num_classes"]) if finite(e.get("num_classes")) else "",
                        _count(e["num_test_examples"]) if finite(e.get("num_test_examples")) else "",
                    ]
                    for e in entries
                ]
                tables.append(
                    _table(
                        ["examples per class", "accuracy (median)", "trials", "classes", "test images"],
                        rows,
                        title=f"Few-shot linear probe after step {_count(entries[0]['step'])}",
                    )
                )
            if self.final_loss is not None:
                tables.append(_table(["", "value"], [["Final training loss", f"{self.final_loss:.4f}"]]))
        return [table for table in tables if table]

    def trial_examples_per_class(self) -> str:
        if self.examples_per_class:
            return str(self.examples_per_class)
        return "all" if self.facts.finetune_args is not None else "not recorded"

    def evaluation_data(self) -> str:
        """What bit-finetune evaluated on: the validation folder or split it was given, else examples it held out of
        the training data (finetune/data.py, `split_off_validation`); never the training examples."""
        record = self.dataset_record
        if isinstance(record.get("validation_dir"), str) and record["validation_dir"]:
            return f"the local image folder {_code(public_path(record['validation_dir']))}"
        if self.dataset is None:
            return "examples held out of training"
        if isinstance(record.get("validation_split"), str) and record["validation_split"]:
            return f"the {_code(record['validation_split'])} split of {self.dataset.display}"
        return f"examples of {self.dataset.display} held out of training (a stratified part of each class)"

    # usage -----------------------------------------------------------------------------------------------------

    @property
    def usage_image(self) -> str:
        if self.options.repo_id and self.examples:
            return self.example_url(self.examples[0])
        if self.examples:
            return f"{self.folder_name}/{self.examples[0].file}"
        return "path/to/image.jpg"

    @property
    def top_k(self) -> int:
        return max(1, min(5, self.facts.architecture.num_labels))

    @property
    def sigmoid_scores(self) -> bool:
        # As the pipeline decides (transformers ImageClassificationPipeline.postprocess).
        return self.multi_label or self.facts.architecture.num_labels == 1


CONVERSION_LABELS = {
    "source": "source (as given)",
    "source_kind": "source kind",
    "published_name": "published name",
    "source_url": "downloaded from",
    "source_sha256": "SHA-256 of the source",
    "upstream_dataset": "pre-training data",
    "fine_tuned_on": "fine-tuned on",
    "head": "head",
    "num_labels": "classes",
    "dtype": "weights dtype",
    "architecture": "architecture",
    "bit_transfer_version": "bit-transfer version",
}
HYPERRULE_LABELS = {
    "dataset_size": "training examples (decides the schedule)",
    "median_image_area": "median image area in pixels (decides the resolution)",
    "precrop": "training images resized to (pixels)",
    "crop": "random crop and test resolution (pixels)",
    "steps": "optimizer steps",
    "warmup_steps": "linear warmup steps",
    "decay_steps": "learning rate ÷10 at steps",
    "mixup_alpha": "MixUp α (0: off)",
    "learning_rate": "base learning rate",
    "batch_size": "batch size",
    "micro_batch_size": "micro-batch (gradient accumulation)",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
}


def _oneline(text) -> str:
    """A paragraph written over several template lines, as the one line Markdown renders it as."""
    return " ".join(str(text).split())


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader(__package__, "templates"),
        extensions=["jinja2.ext.do"],
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML; values are prepared (and table cells escaped) in Python
    )
    environment.filters.update(code=_code, count=_count, percent=_percent, oneline=_oneline)
    return environment


def build_model_card(
    facts: FolderFacts, plots: list[Plot], examples: list[ExampleImage], options: CardOptions
) -> ModelCard:
    """The card of a read folder; its metadata is parsed back by `ModelCard` before it is returned."""
    if options.repo_id:
        check_repo_id(options.repo_id, "repo id", namespaced=True)
    card = _CardValues(facts, plots, examples, options)
    files = {
        "conversion": CONVERSION_FILE,
        "hyperrule": HYPERRULE_FILE,
        "finetune_args": FINETUNE_ARGS_FILE,
        "pretraining": PRETRAINING_FILE,
        "preprocessor": PREPROCESSOR_FILE,
        "search_results": SEARCH_RESULTS_FILE,
    }
    text = (
        _environment()
        .get_template(KIND_TEMPLATES[facts.kind])
        .render(card=card, card_data=card.card_data().to_yaml(), files=files)
    )
    text = re.sub(r"\n{3,}", "\n\n", text)  # blank lines left by skipped sections
    return ModelCard(text)


__all__ = [
    "BIBTEX",
    "CardOptions",
    "DatasetReference",
    "build_model_card",
    "check_license",
    "check_repo_id",
    "checked_eval_result",
    "dataset_reference",
    "hub_dataset_id",
    "public_path",
]
