"""What a saved BiT folder says about itself: its network, its preprocessing, and how it was produced.

The folder's files and their names are `modeling_bit.folder_layout`'s: `config.json`, `model.safetensors`,
`preprocessor_config.json` and one metadata file naming its kind (converted, fine-tuned, pre-trained; none for a
plain `save_pretrained` folder), as its producer writes it.

Only the files are read (the safetensors header, not the weights), so a card for R152x4 costs milliseconds.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from modeling_bit.folder_layout import (
    ALL_RESULTS_FILE,
    CONFIG_FILE,
    CONVERSION_FILE,
    EVAL_RESULTS_FILE,
    FINETUNE_ARGS_FILE,
    FINETUNE_LOG_FILE,
    HEAD_TENSORS,
    HYPERRULE_FILE,
    PREPROCESSOR_FILE,
    PRETRAINING_FILE,
    PRETRAINING_LOG_FILE,
    PROBE_RESULTS_FILE,
    SEARCH_RESULTS_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
)
from modeling_bit.variants import architecture_name, small_network_name

_SAFETENSORS_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# PIL's resampling filter numbers, as image processors store them.
_RESAMPLE_NAMES = {0: "nearest", 1: "Lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "Hamming"}


class CardError(ValueError):
    """A folder or a card input that cannot be described truthfully (missing or malformed files, invalid ids)."""


class FolderKind(str, enum.Enum):
    CONVERTED = "converted"
    FINE_TUNED = "fine-tuned"
    PRETRAINED = "pretrained"
    SAVED = "saved"


@dataclass(frozen=True)
class Architecture:
    depths: tuple[int, ...]
    stem_channels: int
    stage_channels: tuple[int, ...]
    num_groups: int | None
    num_labels: int
    parameters: int | None  # None: no readable safetensors header
    head_parameters: int | None
    weights_dtype: str | None

    @property
    def layers(self) -> int:
        """Weight layers counted as ResNet names count them: the stem, three convolutions per unit, the head."""
        return 2 + 3 * sum(self.depths)

    @property
    def standard_name(self) -> str | None:
        """ "R50x1"-style name when this is one of ResNet-v2 50/101/152 at an integer width, else None."""
        return architecture_name(self.depths, self.stem_channels, self.stage_channels)

    @property
    def preset_name(self) -> str | None:
        """The small CPU preset (`bit-tiny`, `bit-small`) this network is, if any."""
        return small_network_name(self.depths, self.stem_channels, self.stage_channels)


@dataclass(frozen=True)
class Preprocessing:
    height: int | None
    width: int | None
    shortest_edge: int | None
    resample: str | None
    center_crop: bool
    convert_rgb: bool
    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @property
    def resolution(self) -> str:
        if self.height and self.width:
            return f"{self.height}×{self.width}"
        return f"shortest edge {self.shortest_edge}" if self.shortest_edge else "as given"

    @property
    def scales_to_unit_range(self) -> bool:
        """Rescaled by 1/255, i.e. 8-bit pixels to [0, 1]."""
        return self.rescale_factor is not None and math.isclose(self.rescale_factor, 1 / 255)

    @property
    def normalises_to_bit_range(self) -> bool:
        """Mean and standard deviation 0.5 per channel after scaling to [0, 1]: BiT's [-1, 1] input."""
        return (
            self.mean is not None
            and self.std is not None
            and set(self.mean) == {0.5}
            and set(self.std) == {0.5}
            and bool(self.rescale_factor)
            and self.scales_to_unit_range
        )


@dataclass(frozen=True)
class FolderFacts:
    folder: Path
    kind: FolderKind
    config: dict
    architecture: Architecture
    preprocessing: Preprocessing | None
    conversion: dict | None = None
    hyperrule: dict | None = None
    finetune_args: dict | None = None
    eval_results: dict | None = None
    all_results: dict | None = None
    pretraining: dict | None = None
    # Logged training steps: HF Trainer's log_history (fine-tuned) or training_log.jsonl (pretrained).
    training_log: list[dict] = field(default_factory=list)
    probe_results: list[dict] = field(default_factory=list)
    search_results: dict | None = None  # the best trial of a random search (`bit-finetune --search`)

    @property
    def label_names(self) -> list[str]:
        id2label = self.config.get("id2label") or {}
        return [str(id2label[key]) for key in sorted(id2label, key=int)]

    @property
    def multi_label(self) -> bool:
        return self.config.get("problem_type") == "multi_label_classification"


def read_folder(folder) -> FolderFacts:
    """Read a saved BiT folder; raise `CardError` if it is not one or a metadata file is unreadable or malformed."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise CardError(f"{folder} is not a saved model folder: {CONFIG_FILE} is missing.")
    config = _read_record(folder, CONFIG_FILE)
    if config.get("model_type") != "bit":
        raise CardError(f"{folder}/{CONFIG_FILE} has model_type {config.get('model_type')!r}; expected 'bit'.")
    optional = {
        name: _read_record(folder, name) if (folder / name).is_file() else None
        for name in RECORD_SHAPES
        if name != CONFIG_FILE
    }
    if optional[PRETRAINING_FILE] is not None:
        kind, training_log = FolderKind.PRETRAINED, _read_json_lines(folder / PRETRAINING_LOG_FILE)
    elif optional[HYPERRULE_FILE] is not None or optional[FINETUNE_ARGS_FILE] is not None:
        kind, training_log = FolderKind.FINE_TUNED, list((optional[FINETUNE_LOG_FILE] or {}).get("log_history") or [])
    elif optional[CONVERSION_FILE] is not None:
        kind, training_log = FolderKind.CONVERTED, []
    else:
        kind, training_log = FolderKind.SAVED, []
    preprocessor = optional[PREPROCESSOR_FILE]
    return FolderFacts(
        folder=folder,
        kind=kind,
        config=config,
        architecture=_architecture(folder, config),
        preprocessing=_preprocessing(preprocessor) if preprocessor is not None else None,
        conversion=optional[CONVERSION_FILE],
        hyperrule=optional[HYPERRULE_FILE],
        finetune_args=optional[FINETUNE_ARGS_FILE],
        eval_results=optional[EVAL_RESULTS_FILE],
        all_results=optional[ALL_RESULTS_FILE],
        pretraining=optional[PRETRAINING_FILE],
        training_log=training_log,
        probe_results=list(optional[PROBE_RESULTS_FILE] or []),
        search_results=optional[SEARCH_RESULTS_FILE] if kind is FolderKind.FINE_TUNED else None,
    )


@dataclass(frozen=True)
class Shape:
    """What a JSON value must be for a card to read it: its type, the types of the fields it reads (absent or null
    is fine), and for a list the type of its items."""

    type: type
    fields: dict = field(default_factory=dict)
    items: type | None = None


_JSON_NAMES = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "an integer"}
# The shape of every file a card reads, as its producer writes it (contracts.md); anything else is refused with
# the file's name rather than failing later inside the card code.
RECORD_SHAPES = {
    CONFIG_FILE: Shape(
        dict,
        {
            "id2label": dict,
            "depths": list,
            "hidden_sizes": list,
            "embedding_size": int,
            "width_factor": int,
            "num_groups": int,
            "problem_type": str,
        },
    ),
    PREPROCESSOR_FILE: Shape(dict),
    CONVERSION_FILE: Shape(dict, {"architecture": dict}),
    HYPERRULE_FILE: Shape(dict, {"overrides": list}),
    FINETUNE_ARGS_FILE: Shape(dict, {"command": list, "dataset": dict, "model": str}),
    EVAL_RESULTS_FILE: Shape(dict, {"eval_accuracy_trials": list}),
    ALL_RESULTS_FILE: Shape(dict),
    FINETUNE_LOG_FILE: Shape(dict, {"log_history": list}),
    PRETRAINING_FILE: Shape(dict, {"command": list, "recipe": dict, "dataset": dict, "differences_from_paper": list}),
    PROBE_RESULTS_FILE: Shape(list, items=dict),
    SEARCH_RESULTS_FILE: Shape(
        dict, {"trials": list, "best_trial": int, "hyperrule": dict, "selection": dict, "test": dict}
    ),
}
# List fields and the type of their items.
_LIST_ITEMS = {
    (FINETUNE_LOG_FILE, "log_history"): dict,
    (HYPERRULE_FILE, "overrides"): str,
    (SEARCH_RESULTS_FILE, "trials"): dict,
}
# Accuracies are fractions; a percentage (or anything else) would print as 6000% in a table.
_FRACTION_FILES = {EVAL_RESULTS_FILE, ALL_RESULTS_FILE, PROBE_RESULTS_FILE, SEARCH_RESULTS_FILE}


def _read_record(folder: Path, name: str):
    path, shape = folder / name, RECORD_SHAPES[name]
    value = _read_json(path)
    _check_type(path, "the file", value, shape.type)
    for item in value if shape.items else ():
        _check_type(path, "every entry", item, shape.items)
    for key, expected in shape.fields.items():
        if value.get(key) is not None:
            _check_type(path, f"{key!r}", value[key], expected)
            if (name, key) in _LIST_ITEMS:
                for item in value[key]:
                    _check_type(path, f"every entry of {key!r}", item, _LIST_ITEMS[name, key])
    if name in _FRACTION_FILES:
        for entry in value if isinstance(value, list) else [value]:
            _check_accuracies(path, entry)
    return value


def _check_accuracies(path: Path, record: dict) -> None:
    for key, recorded in record.items():
        if "accuracy" not in key:
            continue
        for number in recorded if isinstance(recorded, list) else [recorded]:
            if isinstance(number, (int, float)) and not isinstance(number, bool) and not 0 <= number <= 1:
                raise CardError(f"{path}: {key!r} holds {number!r}; accuracies are fractions in [0, 1].")


def _check_type(path: Path, what: str, value, expected: type) -> None:
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        found = _JSON_NAMES.get(type(value), f"JSON {json.dumps(value)[:40]}")
        raise CardError(f"{path}: {what} should be {_JSON_NAMES[expected]}, not {found}.")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CardError(f"{path} is not readable JSON: {error}") from error


def _read_json_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise CardError(f"{path}, line {number}, is not JSON: {error}") from error
            _check_type(path, f"line {number}", entry, dict)
            entries.append(entry)
    return entries


def _architecture(folder: Path, config: dict) -> Architecture:
    # Our configs fold the width into embedding_size/hidden_sizes and write width_factor 1; a stock
    # transformers config may not, so the width factor multiplies what is stored.
    width = int(config.get("width_factor") or 1)
    shapes, dtypes = _weight_headers(folder)
    parameters = sum(math.prod(shape) for shape in shapes.values()) if shapes else None
    head = sum(math.prod(shapes[name]) for name in HEAD_TENSORS if name in shapes) if shapes else None
    return Architecture(
        depths=tuple(int(depth) for depth in config.get("depths", ())),
        stem_channels=int(config.get("embedding_size", 0)) * width,
        stage_channels=tuple(int(size) * width for size in config.get("hidden_sizes", ())),
        num_groups=config.get("num_groups"),
        num_labels=len(config.get("id2label") or {}),
        parameters=parameters,
        head_parameters=head,
        weights_dtype="/".join(sorted(dtypes)) if dtypes else None,
    )


def _weight_headers(folder: Path) -> tuple[dict[str, list[int]], set[str]]:
    """Tensor shapes and dtypes from the safetensors headers (single file or sharded); empty if there are none."""
    index = folder / WEIGHTS_INDEX_FILE
    files = sorted(set(_read_json(index).get("weight_map", {}).values())) if index.is_file() else [WEIGHTS_FILE]
    shapes, dtypes = {}, set()
    for name in files:
        path = folder / name
        if not path.is_file():
            return {}, set()
        try:
            with open(path, "rb") as stream:
                (length,) = struct.unpack("<Q", stream.read(8))
                header = json.loads(stream.read(length))
        except (OSError, struct.error, ValueError) as error:
            raise CardError(f"{path} has no readable safetensors header: {error}") from error
        for tensor, entry in header.items():
            if tensor != "__metadata__":
                shapes[tensor] = entry["shape"]
                dtypes.add(_SAFETENSORS_DTYPE_NAMES.get(entry["dtype"], entry["dtype"]))
    return shapes, dtypes


def _preprocessing(values: dict) -> Preprocessing:
    size = values.get("size") or {}
    if isinstance(size, int):
        size = {"height": size, "width": size}
    normalize = values.get("do_normalize", True)
    return Preprocessing(
        height=size.get("height") if values.get("do_resize", True) else None,
        width=size.get("width") if values.get("do_resize", True) else None,
        shortest_edge=size.get("shortest_edge") if values.get("do_resize", True) else None,
        resample=_RESAMPLE_NAMES.get(values.get("resample")),
        center_crop=bool(values.get("do_center_crop", False)),
        convert_rgb=bool(values.get("do_convert_rgb", True)),
        rescale_factor=values.get("rescale_factor") if values.get("do_rescale", True) else None,
        mean=_per_channel(values.get("image_mean")) if normalize else None,
        std=_per_channel(values.get("image_std")) if normalize else None,
    )


def _per_channel(value) -> tuple[float, ...] | None:
    """Image processors store a mean or standard deviation per channel, or one for all channels."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(value) if isinstance(value, list) else None


__all__ = ["Architecture", "CardError", "FolderFacts", "FolderKind", "Preprocessing", "read_folder"]
