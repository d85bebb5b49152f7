"""How a VTAB task's label is derived from what its dataset stores.

VTAB defines several of its labels from a dataset's annotations rather than taking a class column as it is: the
number of CLEVR objects, binned distances to the closest CLEVR object or KITTI vehicle, dSprites positions and
orientations grouped into fewer classes. Each derivation here is written from the released VTAB code
(google-research/task_adaptation, `task_adaptation/data/{clevr,kitti,dsprites}.py`; its `scripts/run_all_tasks.sh`
names the 19 task configurations), in the same arithmetic, so a raw copy of a dataset gets VTAB's labels:

- `clevr-count` (clevr.py `_count_preprocess_fn`): the number of objects minus 3 (scenes hold 3 to 10 objects);
- `clevr-distance` (clevr.py `_closest_object_preprocess_fn`): the depth of the closest object (the smallest
  third pixel coordinate) binned by the thresholds 0, 8, 8.5, 9, 9.5, 10, 100;
- `kitti-vehicle-distance` (kitti.py `_closest_vehicle_distance_pp`): the depth of the closest vehicle (object
  types 0-2: car, van, truck; 1000 when there is none) binned by -100, 8, 20, 999: three distances and "no
  vehicle";
- `bin` (dsprites.py `preprocess_fn`): an integer attribute with `source_classes` values grouped into `classes`
  classes, `floor(value / (source_classes / classes))`; VTAB uses it for dSprites' 32 x positions and 40
  orientations, each into 16 classes;
- `class`: the dataset's own class index (every natural and specialized task, DMLab, SmallNORB).

A threshold binning takes the largest i with `thresholds[i] < value`, as VTAB's `reduce_max(where(thrs - dist <
0))` does. A `LabelRule` names the derivation, the column it reads and the number of classes; `applied_by_source`
records that the dataset already stores the derived label (the Hub copies the registry reads were exported with
VTAB's own code), so the column is read as it is and only checked to be in range.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence

from finetune.errors import FinetuneInputError

# clevr.py: scenes hold 3 to 10 objects; the label counts from 3.
CLEVR_MIN_OBJECTS = 3
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
# kitti.py: object types below 3 are vehicles (car, van, truck); 1000 m stands for "no vehicle".
KITTI_VEHICLE_TYPES = 3
KITTI_NO_VEHICLE_DEPTH = 1000.0
KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)


class LabelError(FinetuneInputError):
    """An example whose annotation does not give a label under its task's derivation."""


def threshold_bin(value: float, thresholds: Sequence[float]) -> int:
    """The largest i with thresholds[i] < value (VTAB's `reduce_max(where(thrs - value < 0))`)."""
    below = [index for index, threshold in enumerate(thresholds) if threshold < value]
    if not below:
        raise LabelError(f"value {value} is not above the first threshold {thresholds[0]}")
    return below[-1]


def object_field(objects, field: str) -> list:
    """One field of every object, from `datasets`' dict of lists or a list of per-object dicts."""
    if isinstance(objects, Mapping):
        if field not in objects:
            raise LabelError(f"the objects have no field {field!r} (fields: {sorted(objects)})")
        return list(objects[field])
    try:
        return [item[field] for item in objects]
    except (KeyError, TypeError) as error:
        raise LabelError(f"expected objects with a field {field!r}, got {objects!r:.80}") from error


def clevr_count(objects) -> int:
    """VTAB Clevr/count: number of objects - 3."""
    return len(object_field(objects, "pixel_coords")) - CLEVR_MIN_OBJECTS


def clevr_distance(objects) -> int:
    """VTAB Clevr/distance: the closest object's depth (third pixel coordinate), binned."""
    depths = [coords[2] for coords in object_field(objects, "pixel_coords")]
    if not depths:
        raise LabelError("a scene without objects has no closest object")
    return threshold_bin(min(depths), CLEVR_DISTANCE_THRESHOLDS)


def kitti_vehicle_distance(objects) -> int:
    """VTAB KITTI/distance: the closest vehicle's depth (third location coordinate, metres), binned; no vehicle is
    the last class."""
    types = object_field(objects, "type")
    locations = object_field(objects, "location")
    depths = [location[2] for kind, location in zip(types, locations, strict=True) if kind < KITTI_VEHICLE_TYPES]
    return threshold_bin(min([*depths, KITTI_NO_VEHICLE_DEPTH]), KITTI_DISTANCE_THRESHOLDS)


def binned_attribute(value: int, *, source_classes: int, classes: int) -> int:
    """VTAB dSprites: `floor(value / (source_classes / classes))`, in exact integer arithmetic."""
    value = int(value)
    if not 0 <= value < source_classes:
        raise LabelError(f"value {value} is outside 0..{source_classes - 1}")
    return value * classes // source_classes


def class_index(value) -> int:
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise LabelError(f"expected an integer class index, got {value!r:.80}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Derivation:
    """A named label derivation: `derive(value, **parameters)`, a line for tables, the class names."""

    derive: Callable[..., int]
    summary: str  # with {parameters} filled in
    class_names: Callable[[int], list[str]] | None = None  # None: the dataset's names, else "0".."n-1"


def _clevr_count_names(classes: int) -> list[str]:
    return [f"{count + CLEVR_MIN_OBJECTS} objects" for count in range(classes)]


def _clevr_distance_names(classes: int) -> list[str]:
    bounds = CLEVR_DISTANCE_THRESHOLDS
    return [f"depth {low:g}-{high:g}" for low, high in zip(bounds, bounds[1:])][:classes]


def _kitti_distance_names(classes: int) -> list[str]:
    near, far = KITTI_DISTANCE_THRESHOLDS[1:3]
    return [f"closer than {near:g} m", f"{near:g}-{far:g} m", f"farther than {far:g} m", "no vehicle"][:classes]


DERIVATIONS: dict[str, Derivation] = {
    "class": Derivation(class_index, "class index"),
    "clevr-count": Derivation(clevr_count, "objects - 3", _clevr_count_names),
    "clevr-distance": Derivation(
        clevr_distance,
        "closest object's depth, bins " + "/".join(f"{value:g}" for value in CLEVR_DISTANCE_THRESHOLDS[1:-1]),
        _clevr_distance_names,
    ),
    "kitti-vehicle-distance": Derivation(
        kitti_vehicle_distance,
        "closest vehicle's depth, bins " + "/".join(f"{value:g}" for value in KITTI_DISTANCE_THRESHOLDS[1:-1]) + " m",
        _kitti_distance_names,
    ),
    "bin": Derivation(binned_attribute, "{source_classes} values binned into {classes}"),
}


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """How one task's label comes from its dataset's `column` (see the module docstring)."""

    derivation: str
    column: str
    classes: int
    parameters: dict = dataclasses.field(default_factory=dict)
    applied_by_source: bool = False

    def __post_init__(self):
        if self.derivation not in DERIVATIONS:
            raise FinetuneInputError(
                f"label derivation {self.derivation!r}: expected one of {', '.join(sorted(DERIVATIONS))}."
            )
        if not isinstance(self.classes, int) or self.classes < 2:
            raise FinetuneInputError(f"label classes {self.classes!r}: expected an integer of at least 2.")
        if self.derivation == "bin" and set(self.parameters) != {"source_classes"}:
            raise FinetuneInputError("label derivation 'bin' takes one parameter, source_classes.")
        if self.derivation != "bin" and self.parameters:
            raise FinetuneInputError(f"label derivation {self.derivation!r} takes no parameters.")

    def label(self, value) -> int:
        """The task's class index for one example's `column` value; `LabelError` when it gives none."""
        if self.applied_by_source:
            label = class_index(value)
        elif self.derivation == "bin":
            label = binned_attribute(value, classes=self.classes, **self.parameters)
        else:
            label = DERIVATIONS[self.derivation].derive(value)
        if not 0 <= label < self.classes:
            raise LabelError(f"label {label} is outside the task's {self.classes} classes")
        return label

    def class_names(self, dataset_names: Sequence[str] | None = None) -> list[str]:
        """Names of the task's classes: the derivation's, else the dataset's own (when it has that many)."""
        names = DERIVATIONS[self.derivation].class_names
        if names is not None:
            return names(self.classes)
        if dataset_names is not None and len(dataset_names) == self.classes and self.derivation == "class":
            return [str(name) for name in dataset_names]
        return [str(index) for index in range(self.classes)]

    def describe(self) -> str:
        """One line for tables: what the label is, from which column, and who derives it."""
        summary = DERIVATIONS[self.derivation].summary.format(classes=self.classes, **self.parameters)
        who = "; stored by the source" if self.applied_by_source and self.derivation != "class" else ""
        return f"{summary} ({self.classes} classes, column {self.column!r}{who})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
