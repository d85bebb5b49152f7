"""Reading BiT checkpoints of any published layout, one tensor at a time, as our (stock transformers) tensors.

Three naming schemes are understood, recognised from the tensor names:

- published `.npz` (docs/recipe.md "Published checkpoints"): `resnet/root_block/standardized_conv2d/kernel`,
  `resnet/block{1..4}/unit{01..}/{a,b,c}/...`, TensorFlow layouts (HWIO kernels, the head as a 1x1 conv);
- timm's ResNetV2-BiT state dicts: `stem.conv.weight`, `stages.{s}.blocks.{u}.norm1.weight`, `head.fc.weight`;
- stock transformers: `bit.embedder.convolution.weight`, ... (also without the `bit.` prefix of `BitModel`).

in any container: `.npz`, `.safetensors`, `.bin`/`.pth` (read with `weights_only=True`) or a transformers
folder. `open_checkpoint` reads only the names and shapes, infers the architecture (stage depths, width
factor, head size) from them and checks every tensor against the network that architecture defines, before
any weight is read; a checkpoint that is not a ResNetV2-BiT raises `CheckpointError` naming the first
offending tensor. `BitCheckpoint.read(name)` then loads one tensor at a time, so converting never holds more
than the tensor at hand besides what the caller keeps.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import string
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .configuration_bit import BitConfig
from .folder_layout import CONFIG_FILE, HEAD_BIAS, HEAD_WEIGHT, PYTORCH_WEIGHTS_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE
from .modeling_bit import BitModel
from .variants import RESNET_STEM_CHANNELS

NUM_STAGES = 4  # ResNet-v2: four stages (docs/recipe.md "Architecture")
RGB_CHANNELS = 3
STEM = "bit.embedder.convolution.weight"
_UNIT_PATTERN = re.compile(r"bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.")
TORCH_SUFFIXES = (".bin", ".pth", ".pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: unreadable, or not a ResNetV2-BiT (the first offending tensor named)."""


# --- layouts: source tensor -> our tensor --------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a source tensor becomes ours: the tensor transform, and the shape maps both ways (for messages)."""

    description: str
    to_ours: Callable[[torch.Tensor], torch.Tensor]
    our_shape: Callable[[tuple], tuple]
    source_shape: Callable[[tuple], tuple]


SAME = Layout("", lambda t: t, lambda s: s, lambda s: s)
# TensorFlow kernels (kh, kw, in, out) -> PyTorch (out, in, kh, kw): a transpose (3, 2, 0, 1).
HWIO = Layout(
    " (HWIO)",
    lambda t: t.permute(3, 2, 0, 1),
    lambda s: (s[3], s[2], s[0], s[1]) if len(s) == 4 else s,
    lambda s: (s[2], s[3], s[1], s[0]),
)
# The published head is a 1x1 conv (1, 1, features, classes) -> linear (classes, features).
HEAD_HWIO = Layout(
    " (a 1x1 conv kernel, HWIO)",
    lambda t: t.reshape(t.shape[2], t.shape[3]).T,
    lambda s: (s[3], s[2]) if len(s) == 4 and s[:2] == (1, 1) else s,
    lambda s: (1, 1, s[1], s[0]),
)
# timm's BiT head is a 1x1 conv (classes, features, 1, 1); a linear head (classes, features) is taken as is.
HEAD_OIHW = Layout(
    " (a 1x1 conv kernel)",
    lambda t: t.reshape(t.shape[0], t.shape[1]),
    lambda s: (s[0], s[1]) if len(s) == 4 and s[2:] == (1, 1) else s,
    lambda s: (s[0], s[1], 1, 1),
)


# --- naming schemes ------------------------------------------------------------------------------------------


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    """`block{stage1}/unit{unit1:02d}` -> a regex capturing the numbers as named groups."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?P<{name}>\\d+)")
    return re.compile("".join(parts))


@dataclass(frozen=True)
class NameRule:
    """A source-name template and the matching name of ours. Fields: {stage}/{unit} count from 0 as ours do,
    {stage1}/{unit1} from 1 (optionally zero-padded, `{unit1:02d}`)."""

    source: str
    ours: str
    layout: Layout = SAME

    def translate(self, name: str, from_source: bool) -> str | None:
        """The other side's name for `name`, or None if `name` does not fit this rule."""
        pattern, other = (self.source, self.ours) if from_source else (self.ours, self.source)
        match = _template_regex(pattern).fullmatch(name)
        if match is None:
            return None
        fields = {key: int(value) for key, value in match.groupdict().items()}
        stage = fields["stage"] if "stage" in fields else fields.get("stage1", 1) - 1
        unit = fields["unit"] if "unit" in fields else fields.get("unit1", 1) - 1
        if stage < 0 or unit < 0:
            return None
        return other.format(stage=stage, unit=unit, stage1=stage + 1, unit1=unit + 1)


@dataclass(frozen=True)
class NamingScheme:
    name: str  # "npz" | "timm" | "transformers"
    example: str
    rules: tuple[NameRule, ...]

    def to_ours(self, source_name: str) -> tuple[str, Layout] | None:
        for rule in self.rules:
            ours = rule.translate(source_name, from_source=True)
            if ours is not None:
                return ours, rule.layout
        return None

    def to_source(self, our_name: str) -> str:
        for rule in self.rules:
            source = rule.translate(our_name, from_source=False)
            if source is not None:
                return source
        return our_name


_LAYER = "bit.encoder.stages.{stage}.layers.{unit}"
_NPZ_UNIT = "resnet/block{stage1}/unit{unit1:02d}"
_PARTS = {"a": 1, "b": 2, "c": 3}  # the published names call the GN+conv pairs of a unit a, b, c

NPZ_SCHEME = NamingScheme(
    "npz",
    "resnet/root_block/standardized_conv2d/kernel",
    (
        NameRule("resnet/root_block/standardized_conv2d/kernel", STEM, HWIO),
        *(
            rule
            for part, k in _PARTS.items()
            for rule in (
                NameRule(f"{_NPZ_UNIT}/{part}/group_norm/gamma", f"{_LAYER}.norm{k}.weight"),
                NameRule(f"{_NPZ_UNIT}/{part}/group_norm/beta", f"{_LAYER}.norm{k}.bias"),
                NameRule(f"{_NPZ_UNIT}/{part}/standardized_conv2d/kernel", f"{_LAYER}.conv{k}.weight", HWIO),
            )
        ),
        NameRule(f"{_NPZ_UNIT}/a/proj/standardized_conv2d/kernel", f"{_LAYER}.downsample.conv.weight", HWIO),
        NameRule("resnet/group_norm/gamma", "bit.norm.weight"),
        NameRule("resnet/group_norm/beta", "bit.norm.bias"),
        NameRule("resnet/head/conv2d/kernel", HEAD_WEIGHT, HEAD_HWIO),
        NameRule("resnet/head/conv2d/bias", HEAD_BIAS),
    ),
)

_UNIT_LEAVES = (
    *(f"norm{k}.{param}" for k in _PARTS.values() for param in ("weight", "bias")),
    *(f"conv{k}.weight" for k in _PARTS.values()),
    "downsample.conv.weight",
)

TIMM_SCHEME = NamingScheme(
    "timm",
    "stem.conv.weight, stages.0.blocks.0.norm1.weight, norm.weight, head.fc.weight",
    (
        NameRule("stem.conv.weight", STEM),
        *(NameRule(f"stages.{{stage}}.blocks.{{unit}}.{leaf}", f"{_LAYER}.{leaf}") for leaf in _UNIT_LEAVES),
        NameRule("norm.weight", "bit.norm.weight"),
        NameRule("norm.bias", "bit.norm.bias"),
        NameRule("head.fc.weight", HEAD_WEIGHT, HEAD_OIHW),
        NameRule("head.fc.bias", HEAD_BIAS),
    ),
)


def _transformers_scheme(prefix: str) -> NamingScheme:
    """Stock transformers names; a saved `BitModel` has them without the `bit.` prefix (`prefix=""`)."""
    return NamingScheme(
        "transformers",
        "bit.embedder.convolution.weight, bit.encoder.stages.0.layers.0.norm1.weight, classifier.1.weight",
        (
            NameRule(f"{prefix}embedder.convolution.weight", STEM),
            *(
                NameRule(f"{prefix}encoder.stages.{{stage}}.layers.{{unit}}.{leaf}", f"{_LAYER}.{leaf}")
                for leaf in _UNIT_LEAVES
            ),
            NameRule(f"{prefix}norm.weight", "bit.norm.weight"),
            NameRule(f"{prefix}norm.bias", "bit.norm.bias"),
            NameRule(HEAD_WEIGHT, HEAD_WEIGHT),
            NameRule(HEAD_BIAS, HEAD_BIAS),
        ),
    )


TRANSFORMERS_SCHEME = _transformers_scheme("bit.")
BASE_MODEL_SCHEME = _transformers_scheme("")


def detect_scheme(names: list[str]) -> NamingScheme:
    """The naming scheme the tensor names are written in."""
    if any(name.startswith("resnet/") for name in names):
        return NPZ_SCHEME
    if any(name.startswith(("stem.", "stages.")) for name in names):
        return TIMM_SCHEME
    if any(name.startswith("bit.") for name in names):
        return TRANSFORMERS_SCHEME
    if any(name.startswith(("embedder.", "encoder.")) for name in names):
        return BASE_MODEL_SCHEME
    shown = ", ".join(repr(name) for name in names[:3]) or "no tensors at all"
    raise CheckpointError(
        f"The tensor names ({shown}) are not those of a BiT checkpoint. Expected the published layout "
        f"({NPZ_SCHEME.example}), timm's ({TIMM_SCHEME.example}) "
        f"or stock transformers' ({TRANSFORMERS_SCHEME.example})."
    )


# --- containers: names, shapes and lazy reads ----------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    is_float: bool


@dataclass(frozen=True)
class TensorContainer:
    """Tensors of a file (or folder) by name: shapes known up front, data read one tensor at a time."""

    infos: dict[str, TensorInfo]
    read: Callable[[str], torch.Tensor]


def _npy_header(stream) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(shape), dtype


def open_npz(path: Path) -> TensorContainer:
    """A `.npz` archive: each member's header is read for its shape; `read` loads (and CRC-checks) one member."""
    # np.load takes anything that is not a zip archive for a pickle or a single .npy array, and its error for
    # the former advises allow_pickle: say what the file should have been instead.
    not_npz = f"{path} is not a valid published-layout .npz (a zip archive of .npy arrays"
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{not_npz}; it is not a zip archive).")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        infos = {}
        for name in archive.files:
            with archive.zip.open(f"{name}.npy") as stream:
                shape, dtype = _npy_header(stream)
            if dtype.hasobject:
                raise ValueError(f"member {name!r} holds Python objects, not numbers")
            infos[name] = TensorInfo(shape, np.issubdtype(dtype, np.floating))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(f"{not_npz}): {error}") from error

    def read(name: str) -> torch.Tensor:
        try:
            return torch.from_numpy(archive[name])
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({error}); the file is corrupt.") from error

    return TensorContainer(infos, read)


def open_safetensors(paths: list[Path]) -> TensorContainer:
    """One or several (sharded) `.safetensors` files, memory-mapped."""
    infos, owner = {}, {}
    for path in paths:
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path} is not a readable .safetensors file: {error}") from error
        for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            sliced = handle.get_slice(name)
            infos[name] = TensorInfo(tuple(sliced.get_shape()), sliced.get_dtype() in ("F16", "BF16", "F32", "F64"))
            owner[name] = handle
    return TensorContainer(infos, lambda name: owner[name].get_tensor(name))


def open_torch_state_dict(path: Path) -> TensorContainer:
    """A `.bin`/`.pth` state dict, unpickled with `weights_only=True` (plain tensors only; no code can run).

    A training checkpoint holding the state dict under "state_dict" or "model" is unwrapped.
    """
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as error:  # the weights-only unpickler fails on junk with whatever it trips on (KeyError, ...)
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch state dict with weights_only=True ({type(error).__name__}: {error}). "
            "Only plain tensors are accepted; pickled code is never executed."
        ) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    infos = {name: TensorInfo(tuple(value.shape), value.is_floating_point()) for name, value in loaded.items()}
    return TensorContainer(infos, loaded.__getitem__)


def open_transformers_folder(folder: Path) -> TensorContainer:
    """The weights of a transformers folder: model.safetensors, its sharded form, or pytorch_model.bin."""
    single = folder / WEIGHTS_FILE
    index = folder / WEIGHTS_INDEX_FILE
    if single.is_file():
        return open_safetensors([single])
    if index.is_file():
        return open_safetensors([folder / shard for shard in _shard_files(index)])
    if (folder / PYTORCH_WEIGHTS_FILE).is_file():
        return open_torch_state_dict(folder / PYTORCH_WEIGHTS_FILE)
    raise CheckpointError(
        f"{folder} has a {CONFIG_FILE} but no weights: expected {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} "
        f"or {PYTORCH_WEIGHTS_FILE}."
    )


def _shard_files(index: Path) -> list[str]:
    """The shard file names a `model.safetensors.index.json` lists (files of its own folder)."""
    expected = 'expected JSON like {"weight_map": {"tensor name": "model-00001-of-00002.safetensors", ...}}'
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{index} is not a readable safetensors index ({error}); {expected}.") from error
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f'{index} has no "weight_map" of tensor names to shard files; {expected}.')
    shards = sorted(set(weight_map.values()), key=str)
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{index} lists the shard {shard!r}; {expected} (file names in the same folder).")
    return shards


def open_container(path: Path, file_type: str | None = None) -> TensorContainer:
    if path.is_dir():
        return open_transformers_folder(path)
    suffix = (file_type or path.suffix).lower()
    if suffix == ".npz":
        return open_npz(path)
    if suffix == ".safetensors":
        return open_safetensors([path])
    if suffix in TORCH_SUFFIXES:
        return open_torch_state_dict(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint file type {suffix!r}; expected .npz, .safetensors, "
        f"{', '.join(TORCH_SUFFIXES)} or a transformers folder."
    )


# --- architecture inference and validation -------------------------------------------------------------------


@dataclass
class BitCheckpoint:
    """A validated ResNetV2-BiT checkpoint: its architecture and lazy access to its tensors in our layout."""

    path: Path
    scheme: NamingScheme
    depths: list[int]
    width_factor: int
    num_labels: int | None  # classes of the head it holds; None when it has no head
    shapes: dict[str, tuple[int, ...]]  # every tensor of ours it provides, in our state-dict order
    _container: TensorContainer
    _sources: dict[str, tuple[str, Layout]] = field(repr=False)

    @property
    def num_features(self) -> int:
        """Width of the pre-logits (the head's input)."""
        return self.shapes["bit.norm.weight"][0]

    def read(self, our_name: str) -> torch.Tensor:
        """One tensor in our layout, in the dtype it is stored in: a view of the tensor as read (a transposed
        kernel is not contiguous), so that the caller can copy it piece by piece."""
        source_name, layout = self._sources[our_name]
        return layout.to_ours(self._container.read(source_name))


def open_checkpoint(path: str | os.PathLike, *, file_type: str | None = None) -> BitCheckpoint:
    """Open and validate a checkpoint file or transformers folder without reading any weight.

    `file_type` (".npz", ".safetensors", ".pth", ...) overrides the file name's suffix.
    """
    path = Path(path)
    container = open_container(path, file_type)
    scheme = detect_scheme(list(container.infos))
    return _validate(path, container, scheme)


def _validate(path: Path, container: TensorContainer, scheme: NamingScheme) -> BitCheckpoint:
    where = f"{path}: "
    sources: dict[str, tuple[str, Layout]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for source_name, info in container.infos.items():
        mapped = scheme.to_ours(source_name)
        if mapped is None or mapped[0] in sources:
            raise CheckpointError(
                f"{where}unexpected tensor {source_name!r}: not part of a ResNetV2-BiT in the {scheme.name} naming "
                f"(e.g. {scheme.example})."
            )
        if not info.is_float:
            raise CheckpointError(f"{where}tensor {source_name!r} is not floating point.")
        our_name, layout = mapped
        sources[our_name] = (source_name, layout)
        shapes[our_name] = layout.our_shape(info.shape)

    def missing(our_name: str) -> CheckpointError:
        return CheckpointError(f"{where}missing tensor {scheme.to_source(our_name)!r} of a ResNetV2-BiT.")

    if STEM not in shapes:
        raise missing(STEM)
    stem_shape = shapes[STEM]
    width_factor = stem_shape[0] // RESNET_STEM_CHANNELS if len(stem_shape) == 4 else 0
    if len(stem_shape) != 4 or width_factor < 1 or stem_shape[0] % RESNET_STEM_CHANNELS:
        stem_source, stem_layout = sources[STEM]
        raise CheckpointError(
            f"{where}tensor {stem_source!r} has shape {container.infos[stem_source].shape}; a ResNetV2-BiT stem is a "
            f"7x7 convolution from {RGB_CHANNELS} to 64 x width channels, e.g. "
            f"{stem_layout.source_shape((RESNET_STEM_CHANNELS, RGB_CHANNELS, 7, 7))}{stem_layout.description}."
        )

    units: dict[int, set[int]] = {}
    for our_name in shapes:
        match = _UNIT_PATTERN.match(our_name)
        if match is not None:
            units.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    extra_stages = sorted(stage for stage in units if stage >= NUM_STAGES)
    if extra_stages:
        first = next(name for name in shapes if name.startswith(f"bit.encoder.stages.{extra_stages[0]}."))
        raise CheckpointError(
            f"{where}unexpected tensor {sources[first][0]!r}: a ResNetV2-BiT has {NUM_STAGES} stages."
        )
    for stage in range(NUM_STAGES):
        if stage not in units:
            raise missing(f"bit.encoder.stages.{stage}.layers.0.norm1.weight")
    depths = [max(units[stage]) + 1 for stage in range(NUM_STAGES)]

    expected = expected_shapes(depths, width_factor)
    num_features = expected["bit.norm.weight"][0]
    num_labels = None  # a checkpoint without a head is fine if a new head replaces it
    if HEAD_WEIGHT in shapes or HEAD_BIAS in shapes:
        if HEAD_WEIGHT not in shapes:
            raise missing(HEAD_WEIGHT)
        head_source, head_layout = sources[HEAD_WEIGHT]
        if len(shapes[HEAD_WEIGHT]) != 2 or shapes[HEAD_WEIGHT][0] < 1:
            raise CheckpointError(
                f"{where}tensor {head_source!r} has shape {container.infos[head_source].shape}; a ResNetV2-BiT head "
                f"expects {head_layout.source_shape(('classes', num_features))}{head_layout.description}."
            )
        num_labels = shapes[HEAD_WEIGHT][0]
        expected.update({HEAD_WEIGHT: (num_labels, num_features), HEAD_BIAS: (num_labels,)})
    for our_name in shapes:
        if our_name not in expected:
            raise CheckpointError(
                f"{where}unexpected tensor {sources[our_name][0]!r}: not part of a ResNetV2-BiT with depths {depths} "
                "(only the first unit of a stage has a projection shortcut)."
            )
    for our_name, shape in expected.items():
        if our_name not in shapes:
            raise missing(our_name)
        if shapes[our_name] != shape:
            source_name, layout = sources[our_name]
            raise CheckpointError(
                f"{where}tensor {source_name!r} has shape {container.infos[source_name].shape}; a ResNetV2-BiT with "
                f"depths {depths} and width {width_factor} expects {layout.source_shape(shape)}{layout.description}."
            )
    return BitCheckpoint(path, scheme, depths, width_factor, num_labels, expected, container, sources)


def expected_shapes(depths: list[int], width_factor: int) -> dict[str, tuple[int, ...]]:
    """Every backbone tensor of our BiT with these stage depths and width, in state-dict order.

    Read off the network itself, built on the meta device (no memory is allocated).
    """
    config = BitConfig(depths=depths, width_factor=width_factor)
    with torch.device("meta"):
        model = BitModel(config)
    return {f"bit.{name}": tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize
