"""The model card of a bit-vtab run (`O/README.md`): Hub metadata whose model-index lists every task's accuracy with
its dataset (huggingface_hub's `ModelCardData` and `EvalResult`), and the results, tasks and protocol as text,
rendered from `vtab/templates/vtab_card.md.j2`.

A task read from the Hub is named by its dataset id; a task read from this machine by its own name (`clevr-count`),
since a local path means nothing to a reader of the card (the text names the `datasets` builder that read it).
Paths in the recorded command are shortened to their last two parts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from modeling_bit.file_utils import atomic_write_text
from modeling_bit.folder_layout import MODEL_CARD_FILE

from .registry import REGISTRY, TRAIN_EXAMPLES, VtabTask, task_slug
from .results import PLOT_FILE, VtabResults, percent, results_table, tasks_phrase

TEMPLATE_NAME = "vtab_card.md.j2"
TASK_TYPE = "image-classification"


def _is_hub_id(name: str) -> bool:
    if "/" not in name or Path(name).exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _public(text: str) -> str:
    """A path shortened to what it names (the card never shows the producer's file system)."""
    path = Path(text)
    if not path.is_absolute():
        return text
    return "/".join(path.parts[-2:])


def _source_text(task: VtabTask, builder: str | None) -> str:
    source = task.source
    if not source.is_local:
        return source.describe()
    where = _public(source.data_dir if source.data_dir is not None else source.dataset)
    return f"local{f' ({builder})' if builder else ''}: {where}"


def dataset_name(task_name: str) -> str:
    """The model-index dataset name: a registry task is marked as VTAB-1k's, an own task keeps its name."""
    return f"{task_name} (VTAB-1k)" if any(task.name == task_name for task in REGISTRY) else task_name


def dataset_type(task_name: str, result_source: dict) -> str:
    """The model-index `dataset.type` of a task: its Hub dataset id, else the task's own name as a slug (entries are
    told apart by their type, so local tasks cannot share one)."""
    name = str(result_source.get("name", ""))
    if result_source.get("data_dir") is None and _is_hub_id(name):
        return name
    return task_slug(task_name)


def eval_results(results: VtabResults) -> list[EvalResult]:
    """One model-index entry per finished task: top-1 accuracy on its evaluation split."""
    entries = []
    for name, result in results.tasks.items():
        trials = f", median of {len(result.trials)} trials" if len(result.trials) > 1 else ""
        entries.append(
            EvalResult(
                task_type=TASK_TYPE,
                task_name="Image Classification",
                dataset_type=dataset_type(name, result.source),
                dataset_name=dataset_name(name),
                dataset_config=result.source.get("config"),
                dataset_split=result.evaluation_split,
                metric_type="accuracy",
                metric_value=float(result.accuracy),
                metric_name=f"Top-1 accuracy ({TRAIN_EXAMPLES:,} training examples{trials})",
            )
        )
    return entries


def card_data(results: VtabResults, title: str) -> ModelCardData:
    types = [dataset_type(name, result.source) for name, result in results.tasks.items()]
    datasets = sorted({kind for kind in types if _is_hub_id(kind)})
    entries = eval_results(results)
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=TASK_TYPE,
        base_model=results.model if _is_hub_id(results.model) else None,
        datasets=datasets or None,
        tags=["bit", "big-transfer", "vtab", "image-classification"],
        metrics=["accuracy"] if entries else None,
        model_name=title if entries else None,
        eval_results=entries or None,
    )


def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    return environment.from_string(resources.files(__package__).joinpath("templates", TEMPLATE_NAME).read_text())


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def build_card(
    results: VtabResults,
    tasks: Sequence[VtabTask],
    *,
    command: Sequence[str],
    rule_summary: str,
    has_plot: bool,
) -> ModelCard:
    """The run's card; its metadata is parsed back by `ModelCard` (a malformed model-index fails here)."""
    # A local model folder is named by its folder name (a shortened path would read like a Hub id).
    model = Path(results.model).name if Path(results.model).exists() else results.model
    title = f"{model} on VTAB-1k"
    finished = len(results.tasks)
    mean = percent(results.mean)
    scope = "the 19 VTAB-1k tasks" if results.is_full_vtab else tasks_phrase(finished)
    summary = (
        f"`{model}` fine-tuned with BiT-HyperRule on {scope}, {TRAIN_EXAMPLES:,} training examples each "
        f"(Big Transfer, §3.2 of the BiT paper): mean top-1 accuracy **{mean}**."
        if finished
        else f"`{model}` on VTAB-1k: no task has finished yet."
    )
    if results.protocol == "final":
        protocol = (
            f"Each task trains on its {TRAIN_EXAMPLES:,} training examples (VTAB's train800 + 200 validation "
            "examples) and is evaluated on its test split; one BiT-HyperRule setting for every task, no tuning."
        )
    else:
        protocol = (
            "Selection protocol: each task trains on its 800 training examples and is evaluated on its 200 "
            "validation examples (for comparing settings); these are not test accuracies."
        )
    by_name = {task.name: task for task in tasks}
    task_rows, notes = [], []
    for name in results.planned or list(by_name):
        task = by_name.get(name)
        if task is None:
            continue
        result = results.tasks.get(name)
        task_rows.append(
            [
                _cell(name + ("" if task.confirmed else " (unconfirmed)")),
                task.group,
                _cell(_source_text(task, result.source.get("builder") if result else None)),
                _cell(task.label.describe()),
                "yes" if task.flip else "no",
                "yes" if task.crop else "no",
                f"{result.num_eval_examples:,}" if result and result.num_eval_examples is not None else "-",
            ]
        )
        if not task.confirmed:
            notes.append(f"{name}: source unconfirmed: {task.note}.")
        if result and result.unreadable_images:
            notes.append(f"{name}: {result.unreadable_images} unreadable image(s) skipped.")
    local = [task.name for task in tasks if task.source.is_local]
    clip_benchmark = any(task.source.dataset.startswith("clip-benchmark/") for task in tasks)
    limitations = (
        "VTAB-1k measures transfer from 1,000 examples per task; the numbers say how well the representation adapts, "
        "not how a model trained on the full datasets would do. "
        + (
            f"These tasks were read from local data, not from their published sources: {', '.join(local)}. "
            if local
            else ""
        )
        + (
            "The clip-benchmark copies of the VTAB datasets do not publish VTAB's validation split, so the 200 "
            "validation examples of those tasks are the 200 training examples after VTAB's first 800 rather than "
            "VTAB's val200; their 800 are VTAB's train800. "
            if clip_benchmark
            else ""
        )
        + "BiT's upstream data may overlap some test sets (the paper de-duplicates; this run does not)."
    )
    text = _template().render(
        card_data=card_data(results, title).to_yaml(),
        title=title,
        summary=summary,
        protocol=protocol,
        table=results_table(results, tasks),
        plot={
            "file": PLOT_FILE,
            "alt": "VTAB-1k top-1 accuracy: mean, per group and per task",
            "caption": "Mean top-1 accuracy overall and per group (as the BiT paper's Fig. 3), and per task.",
        }
        if has_plot
        else None,
        missing=[name for name in results.planned if name not in results.tasks],
        task_rows=task_rows,
        notes=notes,
        command=" ".join(_public(part) for part in command),
        rule=rule_summary,
        limitations=limitations,
    )
    return ModelCard(text)


def write_card(folder: str | os.PathLike, card: ModelCard) -> Path:
    return atomic_write_text(Path(folder) / MODEL_CARD_FILE, str(card))
