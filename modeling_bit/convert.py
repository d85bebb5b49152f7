"""Converting any published BiT checkpoint into a folder that our classes and stock transformers load.

`convert_to_folder(SOURCE, DIR)` takes a published name (`BiT-M-R101x3`, `bit-s-r50x1`, `BiT-M-R50x1-ILSVRC2012`,
`BiT-R50x1-distilled-224`; case-insensitive; downloaded once into the Hugging Face cache), a local `.npz` in the
published layout, an http(s) URL of one, a timm ResNetV2-BiT state dict (`.safetensors`, or `.bin`/`.pth` read with
`weights_only=True`), or a stock-transformers BiT folder. The architecture is inferred from the tensors; a
checkpoint that is not a ResNetV2-BiT is refused, naming the first offending tensor, before anything is written.

DIR receives config.json (with id2label), model.safetensors, preprocessor_config.json (BiT preprocessing at
the checkpoint's resolution) and bit_conversion.json (how it was produced), in a staging folder that replaces DIR
only when complete; a caller's `finish(staging)` runs last inside it (`bit-convert` writes the model card there,
`model_cards/bit_convert.py`). The head is kept as published (with ImageNet-21k or ILSVRC-2012 class names)
unless `num_labels`/`labels` replace it with a zero-initialised one, as the BiT fine-tuning protocol does.

Weights are streamed: each tensor is read, converted and written before the next one is read, so converting
R152x4 (0.93 B parameters) needs memory for its largest tensor, not for the model.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import struct
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm as hf_tqdm

from .checkpoint_reading import BitCheckpoint, CheckpointError, open_checkpoint, tensor_bytes
from .configuration_bit import BitConfig
from .download import sha256_of_file
from .file_utils import atomic_directory, atomic_write_json
from .folder_layout import (
    CONFIG_FILE,
    CONVERSION_FILE,
    HEAD_BIAS,
    HEAD_WEIGHT,
    PREPROCESSOR_FILE,
    PYTORCH_WEIGHTS_FILE,
    WEIGHTS_FILE,
    square_size,
)
from .image_processing_bit import bit_image_processor
from .labels import IMAGENET21K, dataset_of_head, label_names
from .modeling_bit import MIN_IMAGE_SIZE
from .published import (
    UPSTREAM_RESOLUTION,
    PublishedCheckpoint,
    download_npz_url,
    download_published,
    find_published_checkpoint,
    published_names_help,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
WRITE_SLICE_BYTES = 64 << 20


class ConversionError(ValueError):
    """Unusable conversion options (labels, output folder, dtype, resolution)."""


# --- where the checkpoint comes from -------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    given: str
    kind: str | None  # "published" | "npz" | "url" | "timm" | "transformers"; None: decided by the tensor names
    path: Path  # the local file or folder read
    file_type: str | None = None  # for downloads, whose cached name may lack the .npz suffix
    published: PublishedCheckpoint | None = None
    url: str | None = None


def resolve_source(source: str | os.PathLike | PublishedCheckpoint, *, local_files_only: bool = False) -> Source:
    """Find (downloading if needed) the checkpoint `source` names; raise with the accepted forms if none.

    A name that is an existing file or folder is that file or folder, even if it is also a published name; a
    `PublishedCheckpoint` is always the published file. `local_files_only`: only files already cached.
    """
    if isinstance(source, PublishedCheckpoint):
        return _published_source(source.name, source, local_files_only)
    given = str(source)
    if urllib.parse.urlparse(given).scheme in ("http", "https"):
        path = download_npz_url(given, local_files_only=local_files_only)
        return Source(given, "url", path, file_type=".npz", url=given)
    path = Path(given).expanduser()
    if path.exists():
        if path.is_dir() and not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} is a folder without {CONFIG_FILE}: not a transformers BiT folder.")
        kind = "transformers" if path.is_dir() else "npz" if path.suffix.lower() == ".npz" else None
        return Source(given, kind, path)
    published = find_published_checkpoint(given)
    if published is not None:
        return _published_source(given, published, local_files_only)
    raise CheckpointError(
        f"{given!r} is not a published BiT name, an existing file or folder, or an http(s) URL. Published names "
        f"(case-insensitive): {published_names_help()}."
    )


def _published_source(given: str, published: PublishedCheckpoint, local_files_only: bool) -> Source:
    url = published.url  # read once: the file downloaded is the one recorded
    path = download_published(published, url=url, local_files_only=local_files_only)
    return Source(given, "published", path, file_type=".npz", published=published, url=url)


# --- the new head's labels -----------------------------------------------------------------------------------


def new_head_labels(num_labels: int | None, labels: str | os.PathLike | Sequence[str] | None) -> list[str] | None:
    """The class names of a replacement head, or None to keep the checkpoint's head.

    `labels` is a file with one name per line, or the names themselves; `num_labels` alone gives LABEL_0, ...
    """
    if labels is None:
        if num_labels is None:
            return None
        if num_labels < 1:
            raise ConversionError(f"--num-labels must be a positive number of classes, got {num_labels}.")
        return [f"LABEL_{index}" for index in range(num_labels)]
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise ConversionError(f"Cannot read the labels file {path} (one class name per line): {error}") from error
        origin = f"the labels file {path}"
    else:
        names, origin = [str(name).strip() for name in labels], "labels"
    if not names or not all(names):
        raise ConversionError(f"{origin} must list one non-empty class name per line; got {len(names)} names.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConversionError(f"{origin} names some classes twice: {', '.join(duplicates[:5])}.")
    if num_labels is not None and num_labels != len(names):
        raise ConversionError(f"--num-labels {num_labels} disagrees with the {len(names)} names in {origin}.")
    return names


def published_head_labels(checkpoint: BitCheckpoint, source: Source, source_config: dict) -> list[str]:
    """Class names of the head a checkpoint carries: a transformers folder's own, else the published list its
    class count identifies (21,843: ImageNet-21k, 1,000: ILSVRC-2012, as timm also infers), else LABEL_i."""
    num_labels = checkpoint.num_labels
    own = source_config.get("id2label") or {}
    if len(own) == num_labels:
        return [str(own[key]) for key in sorted(own, key=int)]
    dataset = source.published.head_dataset if source.published else dataset_of_head(num_labels)
    if dataset is not None:
        return label_names(dataset)
    return [f"LABEL_{index}" for index in range(num_labels)]


# --- writing -------------------------------------------------------------------------------------------------


def write_safetensors_streaming(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    read_tensor,
    metadata: dict[str, str],
) -> None:
    """Write a `.safetensors` file one tensor at a time: `read_tensor(name)` is called once per name, in order.

    The format (github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
    giving each tensor's dtype, shape and byte range, padded with spaces to a multiple of 8, then the data.
    The header is known from the shapes alone, so no tensor needs to be held while writing.
    """
    header, offset = {"__metadata__": metadata}, 0
    for name, shape in shapes.items():
        size = tensor_bytes(shape, dtype)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with (
        open(path, "wb") as stream,
        hf_tqdm(total=offset, desc="Converting", unit="B", unit_scale=True, unit_divisor=1024) as progress,
    ):
        stream.write(struct.pack("<Q", len(encoded)))
        stream.write(encoded)
        for name, shape in shapes.items():
            tensor = read_tensor(name)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}.")
            # Cast and lay out a slice of rows at a time: a transposed kernel never exists twice in full.
            rows = max(1, WRITE_SLICE_BYTES // max(1, tensor_bytes(shape[1:], dtype)))
            for start in range(0, shape[0], rows):
                piece = tensor[start : start + rows].to(dtype).contiguous()
                stream.write(piece.reshape(-1).view(torch.uint8).numpy().data)
                progress.update(tensor_bytes(tuple(piece.shape), dtype))
            del tensor, piece
        stream.flush()
        os.fsync(stream.fileno())


def _bit_transfer_version() -> str:
    try:
        return importlib.metadata.version("bit-transfer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_output_dir(output_dir: Path) -> None:
    """Refuse to replace anything but an earlier conversion, and an output that cannot be written, before any work."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"--output {output_dir} is a file; expected a folder to create.")
    existing = next(folder for folder in (output_dir.absolute(), *output_dir.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise ConversionError(
            f"--output {output_dir}: {existing} is a file; expected a folder to create {output_dir} in."
        )
    try:  # a probe, not os.access: root passes os.access where the file system refuses writes anyway
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ConversionError(
            f"--output {output_dir}: cannot write in {existing} ({error.strerror or error}); "
            "expected a writable folder."
        ) from error
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / CONVERSION_FILE).is_file():
        raise ConversionError(
            f"--output {output_dir} exists and is not an earlier bit-convert output ({CONVERSION_FILE} is "
            "missing); refusing to replace it. Choose a new or empty folder."
        )


def _source_config(source: Source) -> dict:
    """config.json, bit_conversion.json and preprocessor_config.json of a transformers source folder."""
    if not source.path.is_dir():
        return {}
    config = _read_json_object(source.path / CONFIG_FILE)
    _refuse_variants_that_are_not_bit(source.path / CONFIG_FILE, config)
    for extra, key in ((CONVERSION_FILE, "_conversion"), (PREPROCESSOR_FILE, "_preprocessor")):
        if (source.path / extra).is_file():
            config[key] = _read_json_object(source.path / extra)
    return config


def _refuse_variants_that_are_not_bit(path: Path, config: dict) -> None:
    # Stock transformers' hybrid/dilated backbones share model_type "bit"; converting one as BiT would be wrong.
    variant_fields = {key: config[key] for key in ("layer_type", "output_stride", "global_padding") if key in config}
    try:
        unsupported = BitConfig(**variant_fields).unsupported_by_preactivation_bit()
    except ValueError as error:
        unsupported = str(error)
    if unsupported is not None:
        raise CheckpointError(f"{path} describes no BiT network: {unsupported}.")


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not readable JSON ({error}); expected a JSON object.") from error
    if not isinstance(value, dict):
        shown = json.dumps(value)
        raise CheckpointError(
            f"{path} holds {shown[:40] + ('...' if len(shown) > 40 else '')}; expected a JSON object {{...}}."
        )
    return value


def _resolution(source: Source, source_config: dict, requested: int | None) -> int:
    """The preprocessing size to record: as requested, else the published checkpoint's, else a source folder's own,
    else the upstream BiT resolution."""
    if requested is not None:
        return requested
    if source.published is not None:
        return source.published.resolution
    return square_size(source_config.get("_preprocessor", {}).get("size")) or UPSTREAM_RESOLUTION


# --- conversion ----------------------------------------------------------------------------------------------


def convert_to_folder(
    source: str | os.PathLike | PublishedCheckpoint,
    output_dir: str | os.PathLike,
    *,
    num_labels: int | None = None,
    labels: str | os.PathLike | Sequence[str] | None = None,
    dtype: str | None = None,
    resolution: int | None = None,
    local_files_only: bool = False,
    finish: Callable[[Path], object] | None = None,
) -> Path:
    """Convert the BiT checkpoint `source` into the transformers folder `output_dir` and return its path.

    `source`: a published name, a `.npz`/`.safetensors`/`.bin`/`.pth` file, an http(s) URL or a transformers
    folder (see the module docstring; an existing file or folder wins over a published name of the same
    spelling), or a `PublishedCheckpoint` (always the published file). `num_labels`/`labels` (a file with one
    name per line, or the names) replace the head with a zero-initialised one; `dtype` is "float32" (default),
    "bfloat16" or "float16"; `resolution` overrides the checkpoint's preprocessing size; `local_files_only`
    forbids downloading (a published name or URL must be cached). `finish(staging)` is called last, with the
    staging folder that then replaces `output_dir` (e.g. to write a model card into it). Everything is checked
    before anything is written; the folder appears complete or not at all (an earlier conversion there is
    replaced).
    """
    output_dir = Path(output_dir)
    dtype_name = dtype or "float32"
    if dtype_name not in DTYPES:
        raise ConversionError(f"--dtype {dtype_name!r}: expected one of {', '.join(DTYPES)}.")
    if resolution is not None and resolution < MIN_IMAGE_SIZE:
        raise ConversionError(
            f"--resolution {resolution}: expected at least {MIN_IMAGE_SIZE} pixels (BiT downsamples by 32; the folder's "
            "image processor resizes to this size)."
        )
    head_labels = new_head_labels(num_labels, labels)
    _check_output_dir(output_dir)
    resolved = resolve_source(source, local_files_only=local_files_only)
    if resolved.path.is_dir() and output_dir.resolve() == resolved.path.resolve():
        raise ConversionError(f"--output {output_dir} is the source folder; choose another folder.")
    source_config = _source_config(resolved)
    checkpoint = open_checkpoint(resolved.path, file_type=resolved.file_type)
    if resolved.kind is None:  # a state dict is "timm" or "transformers" by its tensor names
        resolved = dataclasses.replace(resolved, kind=checkpoint.scheme.name)
    if head_labels is None:
        if checkpoint.num_labels is None:
            raise CheckpointError(
                f"{resolved.path}: missing tensor {checkpoint.scheme.to_source(HEAD_WEIGHT)!r} (the checkpoint has "
                "no head); pass --num-labels or --labels to give it a new one."
            )
        head_labels = published_head_labels(checkpoint, resolved, source_config)
    config = _output_config(checkpoint, source_config, head_labels, dtype_name)
    image_size = _resolution(resolved, source_config, resolution)
    new_head = num_labels is not None or labels is not None
    metadata = _conversion_metadata(resolved, checkpoint, source_config, dtype_name, len(head_labels), new_head)

    shapes = dict(checkpoint.shapes)
    if new_head:  # zeros: the BiT fine-tuning protocol starts a new head at zero
        shapes.update({HEAD_WEIGHT: (len(head_labels), checkpoint.num_features), HEAD_BIAS: (len(head_labels),)})

    def read_tensor(name: str) -> torch.Tensor:
        return torch.zeros(shapes[name]) if new_head and name in (HEAD_WEIGHT, HEAD_BIAS) else checkpoint.read(name)

    try:
        with atomic_directory(output_dir.absolute()) as staging:
            config.save_pretrained(staging)
            write_safetensors_streaming(
                staging / WEIGHTS_FILE, shapes, DTYPES[dtype_name], read_tensor, {"format": "pt"}
            )
            bit_image_processor(image_size).save_pretrained(staging)
            atomic_write_json(staging / CONVERSION_FILE, metadata)
            if finish is not None:
                finish(staging)  # last: it sees the complete folder
    except OSError as error:  # e.g. the disk filled up
        raise ConversionError(f"Writing {output_dir} failed ({error}); it was left as it was.") from error
    logger.info("Converted %s into %s", resolved.given, output_dir)
    return output_dir


def _output_config(
    checkpoint: BitCheckpoint, source_config: dict, head_labels: list[str], dtype_name: str
) -> BitConfig:
    # GN groups and padding are not visible in the tensors: BiT's values, unless a transformers folder says otherwise.
    architecture_fields = ("num_groups", "global_padding", "embedding_dynamic_padding", "layer_type", "hidden_act")
    try:
        config = BitConfig(
            depths=checkpoint.depths,
            width_factor=checkpoint.width_factor,
            id2label=dict(enumerate(head_labels)),
            label2id={name: index for index, name in enumerate(head_labels)},
            architectures=["BitForImageClassification"],
            dtype=dtype_name,
            **{key: source_config[key] for key in architecture_fields if key in source_config},
        )
        config.validate_network()
    except ValueError as error:
        raise CheckpointError(
            f"{checkpoint.path / CONFIG_FILE} describes no BiT network this package runs: {error}"
        ) from error
    return config


def _conversion_metadata(
    source: Source, checkpoint: BitCheckpoint, source_config: dict, dtype_name: str, num_labels: int, new_head: bool
) -> dict:
    published = source.published
    earlier = source_config.get("_conversion", {})  # converting one of our own folders keeps its provenance
    if published is not None:
        upstream, fine_tuned = published.upstream_dataset, published.fine_tuned_on
    elif earlier:
        upstream, fine_tuned = earlier.get("upstream_dataset"), earlier.get("fine_tuned_on")
    else:  # only a 21,843-class head says for sure where it comes from
        head = dataset_of_head(checkpoint.num_labels or 0)
        upstream, fine_tuned = (head, None) if head == IMAGENET21K else (None, None)
    weights = next(
        (
            path
            for path in (source.path, source.path / WEIGHTS_FILE, source.path / PYTORCH_WEIGHTS_FILE)
            if path.is_file()
        ),
        None,
    )  # a sharded folder has no single file to hash
    return {
        "source": source.given,
        "source_kind": source.kind,
        "published_name": published.name if published else None,
        "source_url": source.url,
        "source_sha256": sha256_of_file(weights) if weights else None,
        "upstream_dataset": upstream,
        "fine_tuned_on": fine_tuned,
        "head": "replaced" if new_head else "published",
        "num_labels": num_labels,
        "dtype": dtype_name,
        "architecture": {"depths": list(checkpoint.depths), "width_factor": checkpoint.width_factor},
        "bit_transfer_version": _bit_transfer_version(),
    }


__all__ = ["ConversionError", "Source", "convert_to_folder", "resolve_source"]
