"""The 19 VTAB-1k tasks: one table, one cited row per task, and the task files that add a team's own tasks.

A row (`VtabTask`) says where the task's examples come from (`TaskSource`: anything `datasets.load_dataset` reads,
the image column, and the VTAB-1k slices: 800 training and 200 validation examples, and the test split), how the
label is derived (`vtab.labels.LabelRule`), its group, and whether random horizontal flips and crops stay on.

Sources of the table:

- Task definitions, splits and labels: the released VTAB code, google-research/task_adaptation
  (`scripts/run_all_tasks.sh` names the 19 configurations; `task_adaptation/data/<dataset>.py` defines each one's
  splits, `train800` = the first 800 of its "train" split and `val200` = the first 200 of its "val" split, and
  labels). The BiT paper §3.2 and Fig. 3 group the tasks (natural, specialized, structured) as VTAB does.
- Flip and crop: BiT paper Appendix B, kept in one place, `finetune.hyperrule.NO_FLIP_TASKS` / `NO_CROP_TASKS`
  (the rows are named as there, so the flags are read from them; docs/recipe.md "BiT-HyperRule").
- Data: the `clip-benchmark/wds_vtab-*` datasets on the Hugging Face Hub, exported by LAION-AI/CLIP_benchmark
  (`clip_benchmark/datasets/builder.py`, `build_vtab_dataset`) with task_adaptation itself: VTAB's "train" and
  "test" splits in VTAB's order, images as lossless WebP (column `webp`) and VTAB's label (column `cls`,
  `webdataset_builder.py`). Their Hub pages show the split sizes VTAB's code gives (e.g. SVHN 65,931 = 90% of
  73,257 training images; Caltech101 2,754; dSprites 589,824 / 73,728). They do not publish VTAB's "val" split, so
  the 200 validation examples are the next 200 training examples (`train[800:1000]`) instead of VTAB's val200;
  the 800 are VTAB's train800. dSprites was exported without VTAB's `num_classes=16` (its classnames.txt lists 32
  x positions and 40 orientations), so those two rows bin the stored value as VTAB does. Flowers102 and Sun397 come
  from `dpdl-benchmark` copies whose three splits have TFDS's sizes (1,020 / 1,020 / 6,149 and 76,128 / 10,875 /
  21,750), so VTAB's own slices apply.
- Marked unconfirmed (`confirmed=False`, shown in `--list-tasks` and `--help`): DTD and KITTI/distance, whose
  clip-benchmark copies are listed by CLIP_benchmark (`benchmark/webdatasets.txt`) but whose Hub pages were not
  found; Flowers102 and Sun397, whose column names (`image`, `label`) were not seen.

None of the 19 datasets could be downloaded where this table was written (no network): the sources are as
published, the runner is tested offline on local stand-ins in the same format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from finetune.errors import FinetuneInputError
from finetune.hyperrule import NO_CROP_TASKS, NO_FLIP_TASKS

from .labels import LabelRule

NATURAL, SPECIALIZED, STRUCTURED = "natural", "specialized", "structured"
GROUPS = (NATURAL, SPECIALIZED, STRUCTURED)
# VTAB-1k (BiT paper §3.2; task_adaptation's train800 / val200 / train800val200): 1,000 training examples, 800 to
# train and 200 to validate on when settings are compared, all 1,000 for the reported run.
SELECTION_TRAIN_EXAMPLES = 800
SELECTION_VALIDATION_EXAMPLES = 200
TRAIN_EXAMPLES = SELECTION_TRAIN_EXAMPLES + SELECTION_VALIDATION_EXAMPLES

_SLICE = re.compile(r"^(?P<split>[A-Za-z0-9_.-]+)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


@dataclasses.dataclass(frozen=True)
class SplitSlice:
    """`split[start:stop]` of a dataset (stop None: to the end)."""

    split: str
    start: int = 0
    stop: int | None = None

    @classmethod
    def parse(cls, spec: str, *, field: str) -> SplitSlice:
        match = _SLICE.match(str(spec))
        if match is None:
            raise FinetuneInputError(
                f"{field} {spec!r}: expected a split name or SPLIT[START:STOP] (e.g. train[:800])."
            )
        start, stop = match["start"], match["stop"]
        parsed = cls(match["split"], int(start) if start else 0, int(stop) if stop else None)
        if parsed.stop is not None and parsed.stop <= parsed.start:
            raise FinetuneInputError(f"{field} {spec!r}: the slice is empty.")
        return parsed

    @property
    def size(self) -> int | None:
        return None if self.stop is None else self.stop - self.start

    def overlaps(self, other: SplitSlice) -> bool:
        if self.split != other.split:
            return False
        end, other_end = self.stop or float("inf"), other.stop or float("inf")
        return self.start < other_end and other.start < end

    def __str__(self) -> str:
        if self.start == 0 and self.stop is None:
            return self.split
        return f"{self.split}[{self.start or ''}:{'' if self.stop is None else self.stop}]"


@dataclasses.dataclass(frozen=True)
class TaskSource:
    """Where a task's examples come from.

    `dataset`, `config`, `data_dir`: `datasets.load_dataset(dataset, config, data_dir=...)` (a Hub id, a local
    dataset folder, or a packaged builder such as "imagefolder" with `data_dir`). `train` / `validation`: the 800 and
    200 training examples, as slices; `test`: the split (or slice) evaluated on. Slices are taken in the dataset's
    order (as VTAB does), after a seeded shuffle of each split when `shuffle_seed` is given (for sources stored in
    class order, such as image folders).
    """

    dataset: str
    image_column: str = "image"
    config: str | None = None
    data_dir: str | None = None
    train: str = f"train[:{SELECTION_TRAIN_EXAMPLES}]"
    validation: str = f"train[{SELECTION_TRAIN_EXAMPLES}:{TRAIN_EXAMPLES}]"
    test: str = "test"
    shuffle_seed: int | None = None

    def slices(self) -> dict[str, SplitSlice]:
        return {
            part: SplitSlice.parse(getattr(self, part), field=f"source.{part}")
            for part in ("train", "validation", "test")
        }

    @property
    def is_local(self) -> bool:
        """Whether the data is read from this machine (a folder or a packaged builder over a local folder)."""
        return self.data_dir is not None or Path(self.dataset).exists() or self.dataset.startswith((".", "/", "~"))

    def describe(self) -> str:
        where = self.dataset + (f" ({self.config})" if self.config else "")
        if self.data_dir is not None:
            where += f" {self.data_dir}"
        return where


@dataclasses.dataclass(frozen=True)
class VtabTask:
    """One task: a row of the registry or of a task file (see the module docstring)."""

    name: str
    group: str
    source: TaskSource
    label: LabelRule
    flip: bool = True
    crop: bool = True
    citation: str = ""
    confirmed: bool = True
    note: str = ""

    def __post_init__(self):
        if not self.name or not task_key(self.name):
            raise FinetuneInputError(f"task name {self.name!r}: expected letters or digits.")
        if not self.group:
            raise FinetuneInputError(f"task {self.name!r}: its group is empty.")
        slices = self.source.slices()
        for part, size in (("train", SELECTION_TRAIN_EXAMPLES), ("validation", SELECTION_VALIDATION_EXAMPLES)):
            if slices[part].size != size:
                raise FinetuneInputError(
                    f"task {self.name!r}: source.{part} {str(slices[part])!r} must be a slice of {size} examples "
                    f"(VTAB-1k trains on {SELECTION_TRAIN_EXAMPLES} + {SELECTION_VALIDATION_EXAMPLES})."
                )
        if slices["train"].overlaps(slices["validation"]):
            raise FinetuneInputError(f"task {self.name!r}: source.train and source.validation overlap.")

    @property
    def key(self) -> str:
        return task_key(self.name)

    @property
    def folder_name(self) -> str:
        """The task's folder under the run's output folder (e.g. clevr-count)."""
        return task_slug(self.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict, *, where: str) -> VtabTask:
        """A task from a task file's entry; unknown or missing fields are refused naming `where`."""
        if not isinstance(record, dict):
            raise FinetuneInputError(f"{where}: expected an object with the fields of a task, got {record!r:.80}.")
        record = dict(record)
        try:
            source = _from_fields(TaskSource, record.pop("source", None), where=f"{where}: source")
            label = _from_fields(LabelRule, record.pop("label", None), where=f"{where}: label")
            return _from_fields(cls, {**record, "source": source, "label": label}, where=where)
        except FinetuneInputError as error:
            if str(error).startswith(where):
                raise
            raise FinetuneInputError(f"{where}: {error}") from error


def _from_fields(kind: type, values, *, where: str):
    if not isinstance(values, dict):
        raise FinetuneInputError(f"{where}: expected an object, got {values!r:.80}.")
    fields = {field.name: field for field in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise FinetuneInputError(f"{where}: unknown field(s) {unknown}; the fields are {list(fields)}.")
    missing = [
        name
        for name, field in fields.items()
        if name not in values and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise FinetuneInputError(f"{where}: missing field(s) {missing}.")
    try:
        return kind(**values)
    except TypeError as error:
        raise FinetuneInputError(f"{where}: {error}") from error


def task_slug(name: str) -> str:
    """A task name as a file name: lower case, runs of other characters as one dash (Clevr/count: clevr-count)."""
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")


def task_key(name: str) -> str:
    """How task names are matched: case, spaces, dashes, underscores and slashes do not matter ("cifar100" is
    CIFAR-100, "clevr count" is Clevr/count)."""
    return re.sub(r"[\s_/-]+", "", str(name)).lower()


# --- The table ------------------------------------------------------------------------------------------------

_TASK_ADAPTATION = "google-research/task_adaptation"
_CLIP_BENCHMARK = "clip-benchmark/wds_vtab-{} (exported with task_adaptation by LAION-AI/CLIP_benchmark)"


def _clip_benchmark(name: str) -> TaskSource:
    """A clip-benchmark copy: VTAB's train and test splits, WebP images; train800 and the next 200 (module doc)."""
    return TaskSource(dataset=f"clip-benchmark/wds_vtab-{name}", image_column="webp")


def _cls(classes: int, derivation: str = "class", **parameters) -> LabelRule:
    """The clip-benchmark label column: VTAB's label as stored (`applied_by_source`), or a value to bin."""
    return LabelRule(derivation, "cls", classes, parameters, applied_by_source=derivation != "bin")


def _row(name: str, group: str, source: TaskSource, label: LabelRule, vtab: str, **fields) -> VtabTask:
    """A registry row; flip and crop follow the paper's Appendix B (finetune.hyperrule)."""
    citation = f"{_TASK_ADAPTATION} {vtab}; data: {source.dataset}"
    if source.dataset.startswith("clip-benchmark/"):
        citation = f"{_TASK_ADAPTATION} {vtab}; data: " + _CLIP_BENCHMARK.format(source.dataset.split("-", 2)[-1])
    return VtabTask(
        name, group, source, label, flip=name not in NO_FLIP_TASKS, crop=name not in NO_CROP_TASKS, citation=citation,
        **fields,
    )  # fmt: skip


_NOT_FOUND = "listed by CLIP_benchmark (benchmark/webdatasets.txt) but no Hub page of {} was found"
_COLUMNS_NOT_SEEN = "split sizes match TFDS's; the column names image/label were not seen"

REGISTRY: tuple[VtabTask, ...] = (
    # natural
    _row("Caltech101", NATURAL, _clip_benchmark("caltech101"), _cls(102), "data/caltech.py (caltech101:3, 102 classes)"),
    _row("CIFAR-100", NATURAL, _clip_benchmark("cifar100"), _cls(100), 'data/cifar.py, cifar(num_classes=100)'),
    _row(
        "DTD", NATURAL, _clip_benchmark("dtd"), _cls(47), "data/dtd.py (dtd:3, 47 classes)",
        confirmed=False, note=_NOT_FOUND.format("clip-benchmark/wds_vtab-dtd"),
    ),
    _row(
        "Flowers102", NATURAL,
        TaskSource("dpdl-benchmark/oxford_flowers102", validation="validation[:200]"),
        LabelRule("class", "label", 102), "data/oxford_flowers102.py (train[:800], validation[:200], test)",
        confirmed=False, note=_COLUMNS_NOT_SEEN,
    ),
    _row("Pets", NATURAL, _clip_benchmark("pets"), _cls(37), "data/oxford_iiit_pet.py (oxford_iiit_pet:3, 37 classes)"),
    _row(
        "Sun397", NATURAL,
        TaskSource("dpdl-benchmark/sun397", validation="validation[:200]"),
        LabelRule("class", "label", 397), "data/sun397.py, config tfds (train[:800], validation[:200], test)",
        confirmed=False, note=_COLUMNS_NOT_SEEN,
    ),
    _row("SVHN", NATURAL, _clip_benchmark("svhn"), _cls(10), "data/svhn.py (svhn_cropped:3, 10 classes)"),
    # specialized
    _row("PatchCamelyon", SPECIALIZED, _clip_benchmark("pcam"), _cls(2), "data/patch_camelyon.py (2 classes)"),
    _row("EuroSAT", SPECIALIZED, _clip_benchmark("eurosat"), _cls(10), "data/eurosat.py (eurosat/rgb, 10 classes)"),
    _row("Resisc45", SPECIALIZED, _clip_benchmark("resisc45"), _cls(45), "data/resisc45.py (45 classes)"),
    _row(
        "Retinopathy", SPECIALIZED, _clip_benchmark("diabetic_retinopathy"), _cls(5),
        'data/diabetic_retinopathy.py, diabetic_retinopathy(config="btgraham-300") (5 grades)',
    ),
    # structured
    _row(
        "Clevr/count", STRUCTURED, _clip_benchmark("clevr_count_all"), _cls(8, "clevr-count"),
        'data/clevr.py, clevr(task="count_all")',
    ),
    _row(
        "Clevr/distance", STRUCTURED, _clip_benchmark("clevr_closest_object_distance"), _cls(6, "clevr-distance"),
        'data/clevr.py, clevr(task="closest_object_distance")',
    ),
    _row("DMLab", STRUCTURED, _clip_benchmark("dmlab"), _cls(6), "data/dmlab.py (dmlab:2.0.1, 6 classes)"),
    _row(
        "KITTI/distance", STRUCTURED, _clip_benchmark("kitti_closest_vehicle_distance"),
        _cls(4, "kitti-vehicle-distance"), 'data/kitti.py, kitti(task="closest_vehicle_distance")',
        confirmed=False, note=_NOT_FOUND.format("clip-benchmark/wds_vtab-kitti_closest_vehicle_distance"),
    ),
    _row(
        "dSprites/location", STRUCTURED, _clip_benchmark("dsprites_label_x_position"),
        _cls(16, "bin", source_classes=32),
        'data/dsprites.py, dsprites(predicted_attribute="label_x_position", num_classes=16)',
        note="the source stores the 32 raw x positions (exported without num_classes=16)",
    ),
    _row(
        "dSprites/orientation", STRUCTURED, _clip_benchmark("dsprites_label_orientation"),
        _cls(16, "bin", source_classes=40),
        'data/dsprites.py, dsprites(predicted_attribute="label_orientation", num_classes=16)',
        note="the source stores the 40 raw orientations (exported without num_classes=16)",
    ),
    _row(
        "SmallNORB/azimuth", STRUCTURED, _clip_benchmark("smallnorb_label_azimuth"), _cls(18),
        'data/smallnorb.py, smallnorb(predicted_attribute="label_azimuth") (18 classes)',
    ),
    _row(
        "SmallNORB/elevation", STRUCTURED, _clip_benchmark("smallnorb_label_elevation"), _cls(9),
        'data/smallnorb.py, smallnorb(predicted_attribute="label_elevation") (9 classes)',
    ),
)  # fmt: skip


def registry_task(name: str) -> VtabTask:
    """The registry row of `name` (matched as `task_key` does)."""
    for task in REGISTRY:
        if task.key == task_key(name):
            return task
    raise unknown_task_error(name, REGISTRY)


def unknown_task_error(name: str, known: Sequence[VtabTask]) -> FinetuneInputError:
    groups = sorted({task.group for task in known})
    return FinetuneInputError(
        f"--tasks {name!r}: no such task. Give all, a group ({', '.join(groups)}) or task names: "
        + ", ".join(task.name for task in known)
        + "."
    )


def select_tasks(selectors: Sequence[str] | None, own_tasks: Sequence[VtabTask] = ()) -> list[VtabTask]:
    """The tasks `--tasks` names, in table order (registry first, then the task files'), each once.

    `all` is every registry task and every own task; a group name its tasks; anything else a task's name. Without
    selectors: the own tasks if there are any, else all 19. An own task named like a registry task replaces it."""
    own_keys = {task.key for task in own_tasks}
    known = [task for task in REGISTRY if task.key not in own_keys]
    known += list(own_tasks)
    if not selectors:
        return list(own_tasks) if own_tasks else list(REGISTRY)
    chosen: list[VtabTask] = []
    for selector in selectors:
        key = task_key(selector)
        if key == "all":
            matched = known
        elif key in {task_key(task.group) for task in known}:
            matched = [task for task in known if task_key(task.group) == key]
        else:
            matched = [task for task in known if task.key == key]
            if not matched:
                raise unknown_task_error(selector, known)
        chosen += [task for task in matched if task not in chosen]
    return sorted(chosen, key=known.index)


def load_task_file(path: str | os.PathLike) -> list[VtabTask]:
    """The tasks of a JSON task file: {"tasks": [task, ...]} or [task, ...], each with a registry row's fields
    (`VtabTask.to_dict()`). Relative `source.data_dir` / local `source.dataset` paths are read from the file's
    folder."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise FinetuneInputError(f"--task-file {path}: cannot read it ({error}).") from error
    except ValueError as error:
        raise FinetuneInputError(f"--task-file {path}: not valid JSON ({error}).") from error
    entries = document.get("tasks") if isinstance(document, dict) else document
    if not isinstance(entries, list) or not entries:
        raise FinetuneInputError(f'--task-file {path}: expected a non-empty list of tasks (or {{"tasks": [...]}}).')
    tasks = [_resolve_paths(VtabTask.from_dict(entry, where=f"{path} task {index + 1}"), path.parent)
             for index, entry in enumerate(entries)]  # fmt: skip
    duplicates = sorted({task.name for task in tasks if sum(other.key == task.key for other in tasks) > 1})
    if duplicates:
        raise FinetuneInputError(f"--task-file {path}: tasks named more than once: {duplicates}.")
    return tasks


def _resolve_paths(task: VtabTask, folder: Path) -> VtabTask:
    source = task.source
    updates = {}
    if source.data_dir is not None and not Path(source.data_dir).expanduser().is_absolute():
        updates["data_dir"] = str(folder / source.data_dir)
    if source.dataset.startswith(".") and (folder / source.dataset).exists():
        updates["dataset"] = str(folder / source.dataset)
    return dataclasses.replace(task, source=dataclasses.replace(source, **updates)) if updates else task


def load_task_files(paths: Iterable[str | os.PathLike]) -> list[VtabTask]:
    tasks: list[VtabTask] = []
    for path in paths:
        for task in load_task_file(path):
            if any(task.key == other.key for other in tasks):
                raise FinetuneInputError(f"--task-file {path}: task {task.name!r} is also defined in another file.")
            tasks.append(task)
    return tasks


def list_tasks(tasks: Sequence[VtabTask]) -> str:
    """`bit-vtab --list-tasks`: one line per task (name, group, source, label, flip, crop), unconfirmed marked."""
    header = ("task", "group", "source", "label", "flip", "crop")
    rows = [
        (
            task.name + ("" if task.confirmed else " (unconfirmed)"),
            task.group,
            task.source.describe(),
            task.label.describe(),
            "flip" if task.flip else "no flip",
            "crop" if task.crop else "no crop",
        )
        for task in tasks
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    unconfirmed = [task for task in tasks if not task.confirmed]
    if unconfirmed:
        lines.append("")
        lines += [f"unconfirmed: {task.name}: {task.note}" for task in unconfirmed]
    return "\n".join(lines)
