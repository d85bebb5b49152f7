"""Build a model card for a saved BiT folder: Hub metadata (ModelCardData, EvalResult) and the templated text.

The metadata is built with huggingface_hub's `ModelCardData` and `EvalResult` (never hand-written YAML), and every
id that goes into it is checked first: metric ids against the ones this card reports, dataset ids and model ids
against the Hub's repository-id grammar. The text comes from the one Jinja template in `templates/`; this module
prepares each value so that the template never meets a missing one.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from modeling_bit import labels as label_lists
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

TEMPLATE_NAME = "model_card.md.j2"
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


@dataclass
class Section:
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    command: str = ""
    absent: str = ""


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


# --- the card --------------------------------------------------------------------------------------------------


def shell_command(argv: list) -> str:
    """A recorded command as a shell line, with absolute paths shortened (see `public_path`)."""
    return shlex.join(public_argument(str(part)) for part in argv)


# How pre-training is run (pretraining/pretrain.py's docstring): the script by its path in the repository, under
# accelerate's launcher; `bit-pretrain` is its console script.
PRETRAIN_SCRIPT = "pretraining/pretrain.py"
PRETRAIN_CONSOLE_SCRIPT = "bit-pretrain"


def pretraining_command(argv: list, num_processes) -> list[str]:
    """Pre-training's recorded `sys.argv` as the user reruns it: `sys.argv[0]` is the script's path as Python saw it
    (absolute under `python -m` or `accelerate launch`), so the launcher and the repository path are put back.
    Empty when the recorded program is neither (pre-training started from other Python code records that program's
    argv, which would not rerun anything)."""
    program = Path(str(argv[0])).name if argv else ""
    if program not in ("pretrain.py", PRETRAIN_CONSOLE_SCRIPT):
        return []
    arguments = [str(part) for part in argv[1:]]
    processes = int(num_processes) if finite(num_processes) and num_processes > 1 else 1
    if program == PRETRAIN_CONSOLE_SCRIPT and processes == 1:
        return [PRETRAIN_CONSOLE_SCRIPT, *arguments]
    launcher = ["accelerate", "launch", *(["--num_processes", str(processes)] if processes > 1 else [])]
    return [*launcher, PRETRAIN_SCRIPT, *arguments]


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


class _CardBuilder:
    def __init__(self, facts: FolderFacts, plots: list[Plot], examples: list[ExampleImage], options: CardOptions):
        self.facts, self.plots, self.examples, self.options = facts, plots, examples, options
        conversion = facts.conversion or {}
        self.published = (
            find_published_checkpoint(conversion["published_name"]) if conversion.get("published_name") else None
        )
        self.trials = few_shot_trials(facts)
        if facts.kind is FolderKind.PRETRAINED:
            dataset_record = (facts.pretraining or {}).get("dataset") or {}
        else:
            dataset_record = (facts.finetune_args or {}).get("dataset") or {}
        self.dataset = dataset_reference(dataset_record)
        k = dataset_record.get("examples_per_class") if facts.kind is FolderKind.FINE_TUNED else None
        self.examples_per_class = int(k) if finite(k) and k > 0 else None
        model = (facts.finetune_args or {}).get("model")
        self.start_model = public_path(model) if isinstance(model, str) and model else None
        self.title = self.default_title()
        self.model_reference = options.repo_id or self.folder_name

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
        args = self.facts.finetune_args or {}
        model = str(args.get("model") or "")
        # Only a namespaced Hub id is known to be a Hub model: a bare name is a published BiT name or a
        # preset, and a path is a local folder (bit-finetune records whether it was one).
        if args.get("model_is_local_folder") is True:
            return None
        if (
            self.facts.kind is FolderKind.FINE_TUNED
            and not args.get("from_scratch")
            and "/" in model
            and not looks_like_path(model)
            and valid_repo_id(model)
            and find_published_checkpoint(model) is None
        ):
            return model
        return None

    def datasets(self) -> list[str]:
        ids = []
        conversion = self.facts.conversion or {}
        for key in ("upstream_dataset", "fine_tuned_on"):
            known = UPSTREAM_DATASETS.get(conversion.get(key))
            if self.facts.kind is FolderKind.CONVERTED and known:
                ids.append(known.hub_id)
        if self.dataset and self.dataset.hub_id:
            ids.append(self.dataset.hub_id)
        return list(dict.fromkeys(ids))

    def tags(self) -> list[str]:
        tags = list(BASE_TAGS)
        if self.examples_per_class:
            tags.append("few-shot")
        if self.facts.multi_label or ((self.facts.pretraining or {}).get("dataset") or {}).get("multi_label"):
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
            for metric in evaluation_metrics(self.facts):
                if metric.name == "accuracy":
                    results.append(
                        checked_eval_result(
                            metric_type="accuracy",
                            metric_value=metric.value,
                            metric_name=self.accuracy_label(),
                            **common,
                        )
                    )
                elif metric.name == "top_5_accuracy":
                    results.append(
                        checked_eval_result(
                            metric_type="accuracy", metric_value=metric.value, metric_name="Top-5 accuracy", **common
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

    # labels --------------------------------------------------------------------------------------------------

    def accuracy_label(self) -> str:
        if self.trials is not None:
            shots = f", {self.trials.examples_per_class} examples per class" if self.trials.examples_per_class else ""
            return f"Accuracy (median of {len(self.trials.accuracies)} fine-tuning trials{shots})"
        return "Accuracy"

    @staticmethod
    def probe_label(entry: dict) -> str:
        trials = f", median of {entry['trials']} trials" if finite(entry.get("trials")) else ""
        return f"{entry['examples_per_class']}-shot linear-probe accuracy (held-out images{trials})"

    # text ----------------------------------------------------------------------------------------------------

    def network_name(self) -> str:
        architecture = self.facts.architecture
        if architecture.standard_name:
            return f"ResNet-v2 {architecture.standard_name}"
        if architecture.preset_name:
            return f"`{architecture.preset_name}` ResNet-v2"
        return "ResNet-v2"

    def summary(self) -> str:
        facts, network = self.facts, self.network_name()
        classes = f"{_count(facts.architecture.num_labels)}-class head"
        if facts.kind is FolderKind.CONVERTED:
            if self.published:
                return (
                    f"The published Big Transfer (BiT) checkpoint **{self.published.name}**, {self.published_story()} "
                    f"It is a {network} image classifier ({classes}), converted to `transformers` by "
                    "bit-transfer's `bit-convert`; stock `transformers` loads it as it is."
                )
            return (
                f"A Big Transfer (BiT) {network} image classifier ({classes}), converted to `transformers` by "
                f"bit-transfer's `bit-convert`{self.conversion_source()}."
            )
        if facts.kind is FolderKind.FINE_TUNED:
            args = facts.finetune_args or {}
            shots = f", {self.examples_per_class} examples per class" if self.examples_per_class else ""
            trials = f", median of {len(self.trials.accuracies)} trials" if self.trials else ""
            on = f" on {self.dataset.display}" if self.dataset else ""
            if args.get("from_scratch"):
                start = "trained from random initialisation"
            else:
                start = f"fine-tuned from {_code(self.start_model)}" if self.start_model else "fine-tuned"
            return (
                f"A Big Transfer (BiT) {network} image classifier ({classes}), {start}{on}{shots} with "
                f"bit-transfer's `bit-finetune` and the BiT-HyperRule{trials}."
            )
        if facts.kind is FolderKind.PRETRAINED:
            on = f" on {self.dataset.display}" if self.dataset else ""
            steps = (facts.pretraining or {}).get("steps")
            steps_text = f" for {_count(steps)} steps" if finite(steps) else ""
            return (
                f"A Big Transfer (BiT) {network} ({classes}), pre-trained from random initialisation{on}"
                f"{steps_text} with bit-transfer's implementation of the BiT upstream recipe."
            )
        return (
            f"A Big Transfer (BiT) {network} image classifier ({classes}) saved with `save_pretrained`. "
            "The folder does not record how its weights were produced."
        )

    def published_story(self) -> str:
        checkpoint = self.published
        upstream = UPSTREAM_DATASETS[checkpoint.upstream_dataset]
        if "distilled" in checkpoint.name:
            return (
                f"an R50x1 student distilled on {UPSTREAM_DATASETS[label_lists.ILSVRC2012].display} from a BiT-M "
                "R152x2 teacher, released by the BiT authors."
            )
        pretrained = f"pre-trained by the BiT authors on {upstream.display} ({upstream.size})"
        if checkpoint.fine_tuned_on:
            tuned = UPSTREAM_DATASETS[checkpoint.fine_tuned_on]
            return f"{pretrained} and then fine-tuned by them on {tuned.display} ({tuned.size})."
        return f"{pretrained}."

    def architecture(self) -> Table:
        a = self.facts.architecture
        rows = [
            [
                "Network",
                f"{self.network_name()}: pre-activation bottleneck units, Group Normalization and "
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
        rows.append(["Classes", f"{_count(a.num_labels)}; names in `config.json` → `id2label`{self.label_source()}"])
        if self.facts.multi_label:
            rows.append(["Output", "independent per-class probabilities (sigmoid; multi-label)"])
        if self.facts.preprocessing:
            rows.append(["Input resolution", self.facts.preprocessing.resolution])
        if a.weights_dtype:
            rows.append(["Weights", f"{a.weights_dtype}, safetensors"])
        return _table(["", ""], rows)

    def label_source(self) -> str:
        conversion = self.facts.conversion or {}
        if conversion.get("head") == "published":
            dataset = label_lists.dataset_of_head(self.facts.architecture.num_labels)
            if dataset:
                return f" (WordNet synsets of {UPSTREAM_DATASETS[dataset].display}, first lemma)"
        return ""

    def production(self) -> Section:
        kind = self.facts.kind
        if kind is FolderKind.CONVERTED:
            return self.conversion_section()
        if kind is FolderKind.FINE_TUNED:
            return self.finetuning_section()
        if kind is FolderKind.PRETRAINED:
            return self.pretraining_section()
        return Section(
            paragraphs=[
                "Not recorded: this folder has none of bit-transfer's provenance files (`bit_conversion.json`, "
                "`bit_hyperrule.json`, `bit_pretraining.json`). Treat its outputs as untested."
            ]
        )

    def conversion_source(self) -> str:
        record = self.facts.conversion or {}
        source = record.get("source")
        if not isinstance(source, str) or not source:
            return ""
        kind = f" {record['source_kind']}" if isinstance(record.get("source_kind"), str) else ""
        return f" from the{kind} source {_code(public_path(source))}"

    def conversion_section(self) -> Section:
        record = self.facts.conversion
        version = f" (bit-transfer {record['bit_transfer_version']})" if record.get("bit_transfer_version") else ""
        paragraphs = []
        if self.published:
            paragraphs.append(
                f"Converted by `bit-convert`{version} from the checkpoint the BiT authors published as "
                f"{_code(Path(self.published.file).name)} with their code (https://github.com/google-research/big_transfer, "
                f"weights under the Apache-2.0 licence). Tensor names and layouts were mapped to `transformers`' BiT "
                "names (kernels HWIO → OIHW); every tensor was checked against the architecture before writing."
            )
        else:
            paragraphs.append(
                f"Converted by `bit-convert`{version}{self.conversion_source()}; every tensor was checked against the "
                "architecture before writing."
            )
        if record.get("head") == "replaced":
            paragraphs.append(
                f"The classification head was **replaced** by a zero-initialised {_count(record.get('num_labels') or 0)}-class "
                "head, as BiT's fine-tuning protocol starts a new task: until it is fine-tuned, every class gets the "
                "same score."
            )
        labels = {
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
        table = _record_table(record, labels, "Conversion record (`bit_conversion.json`)")
        return Section(paragraphs=paragraphs, tables=[table] if table else [])

    def finetuning_section(self) -> Section:
        args, rule = self.facts.finetune_args or {}, self.facts.hyperrule or {}
        dataset = args.get("dataset") or {}
        counts = [
            f"{_count(dataset['num_train_examples'])} training images"
            if finite(dataset.get("num_train_examples"))
            else "",
            f"{_count(dataset['num_classes'])} classes" if finite(dataset.get("num_classes")) else "",
            f"{self.examples_per_class} per class, drawn at random for each trial" if self.examples_per_class else "",
            f"{dataset['trials']} trials" if finite(dataset.get("trials")) and dataset["trials"] > 1 else "",
        ]
        on = f" on {self.dataset.display}" if self.dataset else ""
        described = ", ".join(part for part in counts if part)
        paragraphs = [
            f"Fine-tuned with `bit-finetune`{on}" + (f" ({described})" if described else "") + ". The BiT-HyperRule "
            f"({BIT_PAPER}, §3.3 and Table 1) derives the setting from the training data: SGD with momentum 0.9 and no "
            "weight decay, a zero-initialised head, linear warmup, the learning rate divided by 10 at 30%, 60% and 90% "
            "of the steps, the resolution from the image size, the number of steps from the dataset size, and MixUp "
            'from 20k examples on. Settings given on the command line replace the rule\'s (marked "given" below).'
        ]
        if self.trials is not None and self.trials.saved_trial is not None:
            drew = "its own training examples and seed" if self.trials.examples_per_class else "its own seed"
            paragraphs.append(
                f"Each trial drew {drew}; this folder holds the weights of trial {self.trials.saved_trial + 1}, the one "
                "with the median accuracy."
            )
        unreadable = (self.facts.all_results or {}).get("unreadable_images")
        if finite(unreadable) and unreadable > 0:
            files = "file was" if unreadable == 1 else "files were"
            paragraphs.append(
                f"{_count(unreadable)} unreadable image {files} skipped (listed in `bit_finetune_args.json`)."
            )
        tables = []
        if rule:
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
            tables.append(
                _table(["setting", "value", "from"], rows, title="BiT-HyperRule record (`bit_hyperrule.json`)")
            )
        command = shell_command(args.get("command") or [])
        return Section(paragraphs=paragraphs, tables=[t for t in tables if t], command=command)

    def pretraining_section(self) -> Section:
        record = self.facts.pretraining
        dataset = record.get("dataset") or {}
        counts = [
            f"{_count(dataset['num_examples'])} images" if finite(dataset.get("num_examples")) else "",
            f"{_count(dataset['num_classes'])} classes" if finite(dataset.get("num_classes")) else "",
            (
                "multi-label, per-class sigmoid loss"
                if dataset.get("multi_label")
                else "single-label, softmax cross-entropy"
            )
            if "multi_label" in dataset
            else "",
        ]
        described = ", ".join(part for part in counts if part)
        on = f" on {self.dataset.display}" if self.dataset else ""
        run = [
            f"{_count(record['steps'])} steps" if finite(record.get("steps")) else "",
            f"global batch {_count(record['global_batch_size'])}" if finite(record.get("global_batch_size")) else "",
            f"final training loss {record['final_loss']:.4g}" if finite(record.get("final_loss")) else "",
        ]
        version = f" (bit-transfer {record['bit_transfer_version']})" if record.get("bit_transfer_version") else ""
        paragraphs = [
            f"Pre-trained from random initialisation with `pretraining/pretrain.py`{version}{on}"
            + (f" ({described})" if described else "")
            + ": "
            + ", ".join(part for part in run if part)
            + f". The recipe is BiT's upstream one ({BIT_PAPER}, §3.3): SGD with momentum 0.9, weight decay, "
            "learning rate scaled with the batch size, linear warmup and step decays; the record below lists every "
            "value this run used."
        ]
        differences = record.get("differences_from_paper") or []
        if differences:
            paragraphs.append(
                "Where this run differs from the paper's recipe:\n\n" + "\n".join(f"- {line}" for line in differences)
            )
        tables = [_record_table(record.get("recipe") or {}, {}, "Recipe record (`bit_pretraining.json` → `recipe`)")]
        command = shell_command(pretraining_command(record.get("command") or [], record.get("num_processes")))
        if record.get("command") and not command:
            paragraphs.append(
                f"The recorded command (`bit_pretraining.json` → `command`) is not a {_code(PRETRAIN_SCRIPT)} or "
                f"{_code(PRETRAIN_CONSOLE_SCRIPT)} command line (the run was started from other Python code), so it is "
                "not shown: the recipe record below lists every value the run used."
            )
        return Section(paragraphs=paragraphs, tables=[t for t in tables if t], command=command)

    def results(self) -> Section:
        facts = self.facts
        section = Section(plots=self.plots)
        if facts.kind is FolderKind.FINE_TUNED:
            metrics = evaluation_metrics(facts)
            dataset = (facts.finetune_args or {}).get("dataset") or {}
            labels = {"accuracy": self.accuracy_label(), "top_5_accuracy": "Top-5 accuracy", "loss": "Loss"}
            rows = [[labels[m.name], _percent(m.value) if m.name != "loss" else f"{m.value:.4f}"] for m in metrics]
            if rows and finite(dataset.get("num_eval_examples")):
                rows.append(["Evaluated images", _count(dataset["num_eval_examples"])])
            table = _table(["metric", "value"], rows, title=f"Evaluation on {self.evaluation_data()}")
            section.tables.append(table)
            if self.trials is not None:
                t = self.trials
                summary = _table(
                    ["examples per class", "trials", "median", "min", "max"],
                    [
                        [
                            self.trial_examples_per_class(),
                            str(len(t.accuracies)),
                            _percent(t.median),
                            _percent(t.minimum),
                            _percent(t.maximum),
                        ]
                    ],
                    title="Accuracy over trials (the paper's few-shot protocol: median over random draws)",
                )
                per_trial = _table(
                    ["trial", "accuracy", "weights in this folder"],
                    [
                        [str(i + 1), _percent(a), "yes" if i == t.saved_trial else ""]
                        for i, a in enumerate(t.accuracies)
                    ],
                )
                section.tables += [summary, per_trial]
        elif facts.kind is FolderKind.PRETRAINED:
            entries = final_probe_results(facts)
            if entries:
                step = entries[0]["step"]
                section.paragraphs.append(
                    "A few-shot linear probe measures the representation during pre-training (upstream validation loss "
                    "can look flat while the representation still improves, paper §4.2 and Fig. 5): a ridge-regression classifier "
                    "on the frozen pre-logits, fit on k random examples per class of held-out images and tested on the "
                    "rest of them."
                )
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
                section.tables.append(
                    _table(
                        ["examples per class", "accuracy (median)", "trials", "classes", "test images"],
                        rows,
                        title=f"Few-shot linear probe after step {_count(step)}",
                    )
                )
            final_loss = (facts.pretraining or {}).get("final_loss")
            if finite(final_loss):
                section.tables.append(_table(["", "value"], [["Final training loss", f"{final_loss:.4f}"]]))
        section.tables = [table for table in section.tables if table]
        section.absent = self.absent_results()
        return section

    def trial_examples_per_class(self) -> str:
        if self.examples_per_class:
            return str(self.examples_per_class)
        return "all" if self.facts.finetune_args is not None else "not recorded"

    def evaluation_data(self) -> str:
        """What bit-finetune evaluated on: the validation folder or split it was given, else examples it held out of
        the training data (finetune/data.py, `split_off_validation`); never the training examples."""
        record = (self.facts.finetune_args or {}).get("dataset") or {}
        if isinstance(record.get("validation_dir"), str) and record["validation_dir"]:
            return f"the local image folder {_code(public_path(record['validation_dir']))}"
        if self.dataset is None:
            return "examples held out of training"
        if isinstance(record.get("validation_split"), str) and record["validation_split"]:
            return f"the {_code(record['validation_split'])} split of {self.dataset.display}"
        return f"examples of {self.dataset.display} held out of training (a stratified part of each class)"

    def absent_results(self) -> str:
        kind = self.facts.kind
        if kind is FolderKind.CONVERTED:
            return (
                "No evaluation results are recorded for this folder: bit-transfer did not measure its accuracy. The "
                "conversion is checked tensor by tensor against the architecture, and bit-transfer's tests check that "
                "converted checkpoints reproduce a reference forward pass written from the paper's description. For "
                f"the published models' accuracy, see {BIT_PAPER}."
            )
        return "No evaluation results are recorded in this folder."

    def usage(self) -> dict:
        facts = self.facts
        k = max(1, min(5, facts.architecture.num_labels))
        if self.options.repo_id and self.examples:
            image = self.example_url(self.examples[0])
        elif self.examples:
            image = f"{self.folder_name}/{self.examples[0].file}"
        else:
            image = "path/to/image.jpg"
        location = "" if self.options.repo_id else "  # this folder (or its Hub id once uploaded)"
        # As the pipeline decides (transformers ImageClassificationPipeline.postprocess).
        sigmoid = facts.multi_label or facts.architecture.num_labels == 1
        pipeline_code = (
            "from transformers import pipeline\n\n"
            f'classifier = pipeline("image-classification", model="{self.model_reference}"){location}\n'
            f'for prediction in classifier("{image}", top_k={k}):\n'
            "    print(f\"{prediction['label']}: {prediction['score']:.4f}\")"
        )
        auto_code = (
            "import torch\n"
            "from transformers import AutoImageProcessor, AutoModelForImageClassification\n"
            "from transformers.image_utils import load_image\n\n"
            f'processor = AutoImageProcessor.from_pretrained("{self.model_reference}")\n'
            f'model = AutoModelForImageClassification.from_pretrained("{self.model_reference}").eval()\n'
            f'image = load_image("{image}")  # a path or an http(s) URL\n'
            "with torch.no_grad():\n"
            '    logits = model(**processor(image, return_tensors="pt")).logits\n'
            f"scores = logits.{'sigmoid()' if sigmoid else 'softmax(-1)'}[0]\n"
            f"top = scores.topk({k})\n"
            "for score, index in zip(top.values.tolist(), top.indices.tolist()):\n"
            '    print(f"{model.config.id2label[index]}: {score:.4f}")'
        )
        note = (
            "With bit-transfer installed, `import modeling_bit` before loading makes the Auto classes return "
            "bit-transfer's implementation of the same network (same outputs, faster on CPU)."
        )
        return {"pipeline": pipeline_code, "auto_classes": auto_code, "note": note}

    def widget_note(self) -> str:
        if not self.examples:
            return ""
        files = ", ".join(_code(example.file) for example in self.examples)
        listed = (
            "are the inference widget's examples"
            if self.options.repo_id
            else "become the inference widget's examples when the card is rendered for a Hub repository "
            "(`bit-model-card FOLDER --repo-id NAMESPACE/NAME`)"
        )
        return (
            f"The images in `examples/` ({files}) {listed}. They are synthetic test patterns drawn by bit-transfer, "
            "not photographs: they show what the output looks like, not how accurate the model is. Try your own images."
        )

    def limitations(self) -> list[str]:
        facts, items = self.facts, []
        conversion = facts.conversion or {}
        upstream = UPSTREAM_DATASETS.get(conversion.get("upstream_dataset"))
        if facts.kind is FolderKind.CONVERTED and not upstream:
            items.append(
                "**Upstream data.** Not recorded for this source: what the weights were trained on, and the biases "
                "they carry, are unknown here. Do not use it to make decisions about people."
            )
        elif facts.kind is FolderKind.CONVERTED:
            tuned = UPSTREAM_DATASETS.get(conversion.get("fine_tuned_on"))
            learned = f"{upstream.display}" + (f" and then {tuned.display}" if tuned else "")
            items.append(
                f"**Upstream data.** The weights learned from {learned}: web photographs labelled against the "
                "WordNet hierarchy. Such collections over-represent some regions, cultures and kinds of photo, and "
                "ImageNet's person categories include labels that have been criticised as offensive and were later "
                "filtered by its maintainers. The model reproduces these biases; do not use it to make decisions "
                "about people."
            )
        elif facts.kind is FolderKind.FINE_TUNED:
            model = self.start_model
            items.append(
                f"**Data.** The model carries what its starting checkpoint {_code(model)} learned upstream (for BiT-S/M: "
                "ILSVRC-2012 or ImageNet-21k web photographs, with their known biases) and whatever the fine-tuning "
                "images over- or under-represent. Do not use it to make decisions about people."
                if model and not (facts.finetune_args or {}).get("from_scratch")
                else "**Data.** The model learned only from its training images and reproduces what they over- or "
                "under-represent. Do not use it to make decisions about people."
            )
        elif facts.kind is FolderKind.PRETRAINED:
            items.append(
                "**Data.** The representation reflects its pre-training images and labels only; whatever they over- or "
                "under-represent, the model does too. Do not use it to make decisions about people."
            )
        items.append(
            "**Label noise.** Image classification labels are noisy and give one class per image although many images "
            "show several objects; the BiT paper finds about half of its best model's remaining CIFAR-10 errors are "
            "label noise or ambiguous images (§6, Fig. 7). Accuracy numbers inherit this noise."
        )
        items.append(self.not_evaluated())
        if self.trials is not None:
            items.append(
                f"**Few-shot variance.** With {self.examples_per_class or 'few'} examples per class, accuracy depends "
                f"on which examples were drawn: the trials range from {_percent(self.trials.minimum)} to "
                f"{_percent(self.trials.maximum)}."
            )
        if conversion.get("head") == "replaced":
            items.append(
                "**Untrained head.** The zero-initialised head gives every class the same score until fine-tuned."
            )
        if facts.preprocessing and facts.preprocessing.height:
            items.append(
                f"**Input.** The model expects photographs preprocessed as described above, at "
                f"{facts.preprocessing.resolution}; other resolutions and other kinds of image (drawings, medical, "
                "satellite, screenshots) are outside what it was trained on unless it is fine-tuned for them."
            )
        pretraining_multi_label = ((facts.pretraining or {}).get("dataset") or {}).get("multi_label")
        if pretraining_multi_label and not facts.multi_label:
            items.append(
                "**Scores.** It was trained with a per-class sigmoid loss, but `config.json` does not set "
                "`problem_type: multi_label_classification`, so the pipeline applies softmax: rank by score, and do "
                "not read the scores as independent probabilities."
            )
        return items

    def not_evaluated(self) -> str:
        kind = self.facts.kind
        if kind is FolderKind.CONVERTED:
            return (
                "**Not evaluated here.** bit-transfer did not measure this folder's accuracy on any dataset, nor its "
                "robustness to distribution shift or its calibration."
            )
        if kind is FolderKind.FINE_TUNED:
            where = self.dataset.display if self.dataset else "its evaluation images"
            return (
                f"**Evaluated only on {where}.** Not on other distributions, not for robustness or calibration; "
                "accuracy elsewhere may be much lower."
            )
        if kind is FolderKind.PRETRAINED:
            return (
                "**Evaluated only upstream.** The only measurements are the training loss and a few-shot linear probe "
                "on held-out pre-training images; transfer to downstream tasks, robustness and calibration were not "
                "measured."
            )
        return "**Not evaluated.** Nothing in this folder records an evaluation."

    def render(self) -> str:
        card_data = self.card_data()
        return _template().render(
            card_data=card_data.to_yaml(),
            title=self.title,
            summary=self.summary(),
            architecture=self.architecture(),
            preprocessing=self.facts.preprocessing.describe() if self.facts.preprocessing else "",
            production=self.production(),
            results=self.results(),
            usage=self.usage(),
            widget_note=self.widget_note(),
            limitations=self.limitations(),
            bibtex=BIBTEX,
        )


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


@cache
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML; values are prepared (and table cells escaped) in Python
    )
    source = resources.files(__package__).joinpath("templates", TEMPLATE_NAME).read_text(encoding="utf-8")
    return environment.from_string(source)


def build_model_card(
    facts: FolderFacts, plots: list[Plot], examples: list[ExampleImage], options: CardOptions
) -> ModelCard:
    """The card of a read folder; its metadata is parsed back by `ModelCard` before it is returned."""
    if options.repo_id:
        check_repo_id(options.repo_id, "repo id", namespaced=True)
    text = _CardBuilder(facts, plots, examples, options).render()
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
