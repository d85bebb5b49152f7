"""Checkpoint conversion: published layout, timm and transformers sources, downloads, from_pretrained by name.

Every checkpoint here is synthetic (random weights in the published layout, written by the test) and every
download goes to a loopback HTTP server started by the test. Logits are compared with an independent
functional forward written below from docs/recipe.md, working directly on the raw `.npz` arrays (HWIO kernels,
TensorFlow names), so that a wrong name mapping or transpose in the converter cannot cancel out.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import REPO_ROOT, randomize_, run_clean_python, serving
from huggingface_hub import constants
from published_layout import published_arrays, write_npz
from safetensors.torch import load_file, save_file

from model_cards import bit_convert
from modeling_bit import BitForImageClassification, BitModel
from modeling_bit.by_name import converted_published_folder, resolve_pretrained_name
from modeling_bit.checkpoint_reading import CheckpointError
from modeling_bit.convert import ConversionError, convert_to_folder
from modeling_bit.download import DownloadError, cached_download_path
from modeling_bit.published import find_published_checkpoint

R50 = (3, 4, 6, 3)
SMALL = (1, 2, 1, 1)  # a second unit in stage 2 exercises the identity shortcut


def arrays_of(depths=SMALL, width=1, num_classes=10, seed=0) -> dict[str, np.ndarray]:
    return dict(published_arrays(depths, width, num_classes, seed))


# --- the reference: docs/recipe.md semantics on the raw arrays ------------------------------------------------


def _ws_conv(x, kernel_hwio, stride=1):
    kernel = torch.from_numpy(kernel_hwio).double().permute(3, 2, 0, 1)  # HWIO -> OIHW
    mean = kernel.mean(dim=(1, 2, 3), keepdim=True)
    var = ((kernel - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    return F.conv2d(x, (kernel - mean) / torch.sqrt(var + 1e-10), stride=stride, padding=(kernel.shape[-1] - 1) // 2)


def _gn_relu(x, arrays, prefix):
    gamma, beta = (torch.from_numpy(arrays[f"{prefix}/{name}"]).double() for name in ("gamma", "beta"))
    return F.relu(F.group_norm(x, 32, gamma, beta, eps=1e-5))


def reference_logits(arrays: dict[str, np.ndarray], pixel_values: torch.Tensor) -> torch.Tensor:
    x = _ws_conv(pixel_values.double(), arrays["resnet/root_block/standardized_conv2d/kernel"], stride=2)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), kernel_size=3, stride=2)
    block = 1
    while f"resnet/block{block}/unit01/a/group_norm/gamma" in arrays:
        unit = 1
        while (prefix := f"resnet/block{block}/unit{unit:02d}") + "/a/group_norm/gamma" in arrays:
            stride = 2 if block > 1 and unit == 1 else 1
            pre = _gn_relu(x, arrays, f"{prefix}/a/group_norm")
            projection = arrays.get(f"{prefix}/a/proj/standardized_conv2d/kernel")
            shortcut = x if projection is None else _ws_conv(pre, projection, stride)
            h = _ws_conv(pre, arrays[f"{prefix}/a/standardized_conv2d/kernel"])
            h = _ws_conv(
                _gn_relu(h, arrays, f"{prefix}/b/group_norm"), arrays[f"{prefix}/b/standardized_conv2d/kernel"], stride
            )
            h = _ws_conv(
                _gn_relu(h, arrays, f"{prefix}/c/group_norm"), arrays[f"{prefix}/c/standardized_conv2d/kernel"]
            )
            x = h + shortcut
            unit += 1
        block += 1
    pooled = _gn_relu(x, arrays, "resnet/group_norm").mean(dim=(2, 3))
    kernel = torch.from_numpy(arrays["resnet/head/conv2d/kernel"]).double()[0, 0]  # (features, classes)
    return pooled @ kernel + torch.from_numpy(arrays["resnet/head/conv2d/bias"]).double()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def our_logits(folder: Path, pixel_values: torch.Tensor) -> torch.Tensor:
    model = BitForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values).logits


PIXELS = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)


@pytest.fixture(scope="module")
def small_arrays():
    return arrays_of()


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, small_arrays) -> Path:
    return write_npz(tmp_path_factory.mktemp("npz") / "small.npz", small_arrays)


@pytest.fixture(scope="module")
def r50_arrays():
    """BiT-S-R50x1-shaped (what the published name promises), 1,000 classes; 25.5 M random parameters."""
    return arrays_of(depths=R50, num_classes=1000, seed=1)


@pytest.fixture(scope="module")
def r50_bytes(tmp_path_factory, r50_arrays) -> bytes:
    return write_npz(tmp_path_factory.mktemp("npz") / "r50.npz", r50_arrays).read_bytes()


# --- local .npz ----------------------------------------------------------------------------------------------


def test_cli_converts_npz_to_a_folder_ours_and_stock_transformers_agree_with_the_reference(
    tmp_path, small_npz, small_arrays
):
    output = tmp_path / "converted"
    completed = subprocess.run(
        [sys.executable, "-m", "model_cards.bit_convert", str(small_npz), "--output", str(output)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr
    assert {p.name for p in output.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "bit_conversion.json",
        "README.md",
    }
    metadata = json.loads((output / "bit_conversion.json").read_text())
    assert metadata == {
        "source": str(small_npz),
        "source_kind": "npz",
        "published_name": None,
        "source_url": None,
        "source_sha256": hashlib.sha256(small_npz.read_bytes()).hexdigest(),
        "upstream_dataset": None,
        "fine_tuned_on": None,
        "head": "published",
        "num_labels": 10,
        "dtype": "float32",
        "architecture": {"depths": list(SMALL), "width_factor": 1},
        "bit_transfer_version": metadata["bit_transfer_version"],
    }
    assert json.loads((output / "preprocessor_config.json").read_text())["size"] == {"height": 224, "width": 224}

    expected = reference_logits(small_arrays, PIXELS)
    assert relative_error(our_logits(output, PIXELS), expected) <= 1e-4
    torch.save(PIXELS, tmp_path / "pixels.pt")
    stock = run_clean_python(
        f"""
        import torch
        from transformers import AutoModelForImageClassification, BitForImageClassification
        x = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        with torch.no_grad():
            logits = [cls.from_pretrained({str(output)!r}).eval()(x).logits.tolist()
                      for cls in (BitForImageClassification, AutoModelForImageClassification)]
        result = logits
        """
    )
    for logits in stock:
        assert relative_error(torch.tensor(logits), expected) <= 1e-4


def test_published_heads_get_wordnet_class_names(tmp_path):
    ilsvrc = convert_to_folder(write_npz(tmp_path / "s.npz", arrays_of(num_classes=1000)), tmp_path / "s")
    id2label = transformers.AutoConfig.from_pretrained(ilsvrc).id2label
    assert (id2label[0], id2label[1], id2label[999]) == ("tench", "goldfish", "toilet tissue")
    assert {id2label[134], id2label[517]} == {"crane (n02012849)", "crane (n03126707)"}  # bird and machine

    # A 21,843-class head can only be BiT-M's ImageNet-21k head.
    m = convert_to_folder(
        write_npz(tmp_path / "m.npz", arrays_of(depths=(1, 1, 1, 1), num_classes=21843)), tmp_path / "m"
    )
    config = transformers.AutoConfig.from_pretrained(m)
    assert len(config.id2label) == len(set(config.id2label.values())) == 21843
    assert (config.id2label[0], config.id2label[21842]) == ("organism", "knothole")
    assert json.loads((m / "bit_conversion.json").read_text())["upstream_dataset"] == "imagenet-21k"


def test_new_head_is_zero_initialised_and_the_backbone_unchanged(tmp_path, small_npz):
    published = convert_to_folder(small_npz, tmp_path / "published")
    by_count = convert_to_folder(small_npz, tmp_path / "count", num_labels=3)
    (tmp_path / "labels.txt").write_text("cat\ndog\n\nbird\n")
    by_file = convert_to_folder(small_npz, tmp_path / "file", labels=tmp_path / "labels.txt", dtype="bfloat16")

    reference = load_file(published / "model.safetensors")
    for folder, names, dtype in (
        (by_count, ["LABEL_0", "LABEL_1", "LABEL_2"], torch.float32),
        (by_file, ["cat", "dog", "bird"], torch.bfloat16),
    ):
        tensors = load_file(folder / "model.safetensors")
        assert torch.equal(tensors["classifier.1.weight"], torch.zeros(3, 2048, dtype=dtype))
        assert torch.equal(tensors["classifier.1.bias"], torch.zeros(3, dtype=dtype))
        for name, value in reference.items():
            if not name.startswith("classifier."):
                assert value.to(dtype).equal(tensors[name]), name
        config = transformers.AutoConfig.from_pretrained(folder)
        assert [config.id2label[i] for i in range(3)] == names
        metadata = json.loads((folder / "bit_conversion.json").read_text())
        assert (metadata["head"], metadata["num_labels"]) == ("replaced", 3)
    assert json.loads((by_file / "bit_conversion.json").read_text())["dtype"] == "bfloat16"
    model = BitForImageClassification.from_pretrained(by_file)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model(PIXELS).logits, torch.zeros(2, 3, dtype=torch.bfloat16))

    with pytest.raises(ConversionError, match="disagrees"):
        convert_to_folder(small_npz, tmp_path / "bad", num_labels=2, labels=tmp_path / "labels.txt")
    assert not (tmp_path / "bad").exists()


def _without(arrays: dict[str, np.ndarray], *names: str) -> dict[str, np.ndarray]:
    return {name: array for name, array in arrays.items() if name not in names}


BAD_CHECKPOINTS = {
    "missing": (
        lambda a: _without(a, "resnet/block3/unit01/b/standardized_conv2d/kernel"),
        "missing tensor 'resnet/block3/unit01/b/standardized_conv2d/kernel'",
    ),
    "extra": (
        lambda a: {
            **a,
            "resnet/block2/unit02/a/proj/standardized_conv2d/kernel": np.zeros((1, 1, 512, 512), np.float32),
        },
        "unexpected tensor 'resnet/block2/unit02/a/proj/standardized_conv2d/kernel'",
    ),
    "unknown name": (
        lambda a: {**a, "resnet/block2/unit01/attention/kernel": np.zeros(3, np.float32)},
        "unexpected tensor 'resnet/block2/unit01/attention/kernel'",
    ),
    "wrong shape": (
        lambda a: {**a, "resnet/block2/unit02/b/standardized_conv2d/kernel": np.zeros((3, 3, 128, 64), np.float32)},
        r"'resnet/block2/unit02/b/standardized_conv2d/kernel' has shape \(3, 3, 128, 64\).*expects \(3, 3, 128, 128\)",
    ),
    "stem width": (
        lambda a: {**a, "resnet/root_block/standardized_conv2d/kernel": np.zeros((7, 7, 3, 48), np.float32)},
        r"'resnet/root_block/standardized_conv2d/kernel' has shape \(7, 7, 3, 48\)",
    ),
    "integer": (
        lambda a: {**a, "resnet/group_norm/beta": np.zeros(2048, np.int32)},
        "'resnet/group_norm/beta' is not floating point",
    ),
    "no head": (
        lambda a: _without(a, "resnet/head/conv2d/kernel", "resnet/head/conv2d/bias"),
        "missing tensor 'resnet/head/conv2d/kernel'.*--num-labels",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_non_bit_checkpoints_are_refused_naming_the_first_offending_tensor(tmp_path, small_arrays, case):
    make, message = BAD_CHECKPOINTS[case]
    source = write_npz(tmp_path / "bad.npz", make(small_arrays))
    with pytest.raises(CheckpointError, match=message):
        convert_to_folder(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.npz"]


def test_corrupt_local_npz_is_refused_and_nothing_written(tmp_path, small_npz):
    data = bytearray(small_npz.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside some tensor's data: its CRC no longer matches
    (tmp_path / "corrupt.npz").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        convert_to_folder(tmp_path / "corrupt.npz", tmp_path / "out")
    (tmp_path / "truncated.npz").write_bytes(small_npz.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="not a valid published-layout .npz"):
        convert_to_folder(tmp_path / "truncated.npz", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.npz", "truncated.npz"]


def test_help_reads_as_written_for_people(capsys, monkeypatch):
    from model_cards.cli import main as bit_model_card
    from modeling_bit.published import PUBLISHED_CHECKPOINT_NAMES

    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width
    for main in (bit_convert.main, bit_model_card):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        assert "_" not in "".join(re.findall(r"--[\w-]+", text)), text  # dash spellings only
        assert not re.search(r"--[\w-]+ \[[A-Z_]+\]", text) and "(default: None)" not in text  # plain switches
        assert "--push " in text
    with pytest.raises(SystemExit):
        bit_convert.main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in PUBLISHED_CHECKPOINT_NAMES)  # never broken at a hyphen
    arguments, positional = bit_convert.build_parser().parse_args_into_dataclasses(
        ["x.npz", "--output", "y", "--num_labels", "3"]  # the underscore spelling is still understood
    )
    assert (positional.source, arguments.num_labels, arguments.push) == ("x.npz", 3, False)


def test_cli_reports_refusals_without_a_traceback(tmp_path, small_arrays):
    source = write_npz(tmp_path / "bad.npz", BAD_CHECKPOINTS["missing"][0](small_arrays))
    completed = subprocess.run(
        [sys.executable, "-m", "model_cards.bit_convert", str(source), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 1
    assert "missing tensor 'resnet/block3/unit01/b/standardized_conv2d/kernel'" in completed.stderr
    assert "Traceback" not in completed.stderr and not (tmp_path / "out").exists()


def _bit_folder_with(tmp_path: Path, files: dict[str, str]) -> Path:
    """A transformers folder whose config.json and other JSON files are replaced by `files`."""
    folder = tmp_path / "source"
    BitForImageClassification(BitForImageClassification.config_class.from_preset("bit-tiny")).save_pretrained(folder)
    for name, text in files.items():
        (folder / name).write_text(text)
    if "model.safetensors.index.json" in files:
        (folder / "model.safetensors").unlink()
    return folder


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


JUNK = np.random.default_rng(0).bytes(4096)


def _object_array_npz(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive, archive.open("resnet/group_norm/beta.npy", "w") as stream:
        np.lib.format.write_array(stream, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return path


BAD_INPUTS = {
    "garbage .npz": (
        lambda tmp: _file(tmp / "garbage.npz", JUNK),
        r"garbage\.npz is not a valid published-layout \.npz \(a zip archive of \.npy arrays; it is not a zip",
    ),
    "pickled arrays in an .npz": (
        lambda tmp: _object_array_npz(tmp / "objects.npz"),
        r"objects\.npz is not a valid published-layout \.npz .*'resnet/group_norm/beta' holds Python objects",
    ),
    "junk .bin": (
        lambda tmp: _file(tmp / "junk.bin", JUNK),
        r"junk\.bin cannot be read as a PyTorch state dict with weights_only=True",
    ),
    "junk .bin the unpickler trips on with a KeyError": (  # BINGET of a memo entry that was never stored
        lambda tmp: _file(tmp / "memo.bin", b"\x80\x02h\x05."),
        r"memo\.bin cannot be read as a PyTorch state dict with weights_only=True \(KeyError",
    ),
    "malformed safetensors index": (
        lambda tmp: _bit_folder_with(tmp, {"model.safetensors.index.json": '{"weight_map": {'}),
        r"source/model\.safetensors\.index\.json is not a readable safetensors index .*expected JSON like "
        r'\{"weight_map"',
    ),
    "safetensors index without a weight map": (
        lambda tmp: _bit_folder_with(tmp, {"model.safetensors.index.json": "[]"}),
        r'source/model\.safetensors\.index\.json has no "weight_map"',
    ),
    "safetensors index naming a file elsewhere": (
        lambda tmp: _bit_folder_with(
            tmp, {"model.safetensors.index.json": '{"weight_map": {"bit.norm.weight": "../x.safetensors"}}'}
        ),
        r"lists the shard '\.\./x\.safetensors'",
    ),
    "config.json holding an array": (
        lambda tmp: _bit_folder_with(tmp, {"config.json": "[1, 2, 3]"}),
        r"source/config\.json holds \[1, 2, 3\]; expected a JSON object",
    ),
    "unreadable config.json": (
        lambda tmp: _bit_folder_with(tmp, {"config.json": "{"}),
        r"source/config\.json is not readable JSON .*expected a JSON object",
    ),
    "a dilated (not BiT) transformers config": (
        lambda tmp: _bit_folder_with(
            tmp,
            {
                "config.json": json.dumps(
                    {**BitForImageClassification.config_class.from_preset("bit-tiny").to_dict(), "output_stride": 16}
                )
            },
        ),
        r"source/config\.json describes no BiT network: output_stride=16 \(stage4 would be dilated; BiT does not",
    ),
    "preprocessor_config.json holding a string": (
        lambda tmp: _bit_folder_with(tmp, {"preprocessor_config.json": '"224"'}),
        r'source/preprocessor_config\.json holds "224"; expected a JSON object',
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_unreadable_inputs_are_refused_saying_what_was_expected(tmp_path, case):
    make, message = BAD_INPUTS[case]
    source = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match=message) as refused:
        convert_to_folder(source, tmp_path / "out")
    assert "allow_pickle" not in str(refused.value)
    assert sorted(tmp_path.rglob("*")) == before  # no output, no staging folder


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, server, hf_cache, small_npz):
    (tmp_path / "a-file").write_text("not a folder")
    server.files["/BiT-S-R50x1.npz"] = b"never downloaded"
    before = sorted(tmp_path.rglob("*"))
    for output, message in (
        (tmp_path / "a-file", "is a file; expected a folder to create"),
        (tmp_path / "a-file" / "model", r"a-file is a file; expected a folder to create .*model in"),
        (Path("/sys/bit-convert-test"), r"cannot write in /sys \(Permission denied\); expected a writable folder"),
    ):
        for source in (small_npz, "BiT-S-R50x1"):
            with pytest.raises(ConversionError, match=message):
                convert_to_folder(source, output)
    # A resolution the network cannot take would make a folder whose own image processor feeds it too little.
    with pytest.raises(ConversionError, match="--resolution 16: expected at least 32 pixels"):
        convert_to_folder(small_npz, tmp_path / "small", resolution=16)
    assert server.requests == [] and sorted(tmp_path.rglob("*")) == before


def test_the_card_is_written_before_the_folder_appears_and_failures_leave_no_staging_folder(
    tmp_path, small_npz, monkeypatch
):
    plain = convert_to_folder(small_npz, tmp_path / "plain")  # modeling_bit alone writes no card
    assert not (plain / "README.md").exists()
    shutil.rmtree(plain)
    folder = bit_convert.convert_with_card(small_npz, tmp_path / "my-bit")
    card = (folder / "README.md").read_text()
    assert 'model="my-bit"' in card and ".partial" not in card and "_named" not in card
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "bit_conversion.json",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]

    def card_fails(staging, folder_name):
        assert (staging / "bit_conversion.json").is_file()  # the card is written last, into the staging folder
        assert folder_name in ("my-bit", "new") and staging.name != folder_name  # named for where it will be
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bit_convert, "write_model_card", card_fails)
    with pytest.raises(ConversionError, match=r"Writing .*my-bit failed .*No space left.*left as it was"):
        bit_convert.convert_with_card(small_npz, folder, num_labels=2)
    with pytest.raises(ConversionError, match="No space left"):
        bit_convert.convert_with_card(small_npz, tmp_path / "new")
    assert transformers.AutoConfig.from_pretrained(folder).num_labels == 10  # the earlier conversion is intact
    assert (folder / "README.md").read_text() == card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-bit"]  # no staging folder, no "new"


def test_headless_checkpoint_converts_with_a_new_head_and_other_folders_are_not_replaced(tmp_path, small_arrays):
    source = write_npz(tmp_path / "headless.npz", BAD_CHECKPOINTS["no head"][0](small_arrays))
    folder = convert_to_folder(source, tmp_path / "out", num_labels=4)
    assert BitForImageClassification.from_pretrained(folder).config.num_labels == 4
    convert_to_folder(source, folder, num_labels=2)  # an earlier conversion is replaced
    assert BitForImageClassification.from_pretrained(folder).config.num_labels == 2

    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not an earlier bit-convert output"):
        convert_to_folder(source, tmp_path / "precious", num_labels=2)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# --- timm and transformers sources ---------------------------------------------------------------------------


def timm_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The published arrays under timm's ResNetV2-BiT names and PyTorch layouts (timm's head is a 1x1 conv)."""
    state = {}
    for name, array in arrays.items():
        tensor = torch.from_numpy(array)
        if tensor.ndim == 4:
            tensor = tensor.permute(3, 2, 0, 1).contiguous()
        key = name.removeprefix("resnet/")
        if key == "root_block/standardized_conv2d/kernel":
            key = "stem.conv.weight"
        elif key.startswith("head/conv2d/"):
            key = "head.fc." + {"kernel": "weight", "bias": "bias"}[key.rsplit("/", 1)[1]]
        elif key.startswith("group_norm/"):
            key = "norm." + {"gamma": "weight", "beta": "bias"}[key.rsplit("/", 1)[1]]
        else:
            block, unit, part, *rest = key.split("/")
            prefix = f"stages.{int(block[5:]) - 1}.blocks.{int(unit[4:]) - 1}"
            index = "abc".index(part) + 1
            if rest[0] == "proj":
                key = f"{prefix}.downsample.conv.weight"
            elif rest[0] == "group_norm":
                key = f"{prefix}.norm{index}." + {"gamma": "weight", "beta": "bias"}[rest[1]]
            else:
                key = f"{prefix}.conv{index}.weight"
        state[key] = tensor
    return state


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/bit-convert-executed-a-pickle",))


def test_timm_state_dicts_convert_from_safetensors_and_weights_only_pth(tmp_path, small_arrays):
    state = timm_state_dict(small_arrays)
    save_file(state, tmp_path / "timm.safetensors")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "timm.pth")
    expected = reference_logits(small_arrays, PIXELS)
    for name in ("timm.safetensors", "timm.pth"):
        folder = convert_to_folder(tmp_path / name, tmp_path / f"out-{name}")
        assert relative_error(our_logits(folder, PIXELS), expected) <= 1e-4
        assert json.loads((folder / "bit_conversion.json").read_text())["source_kind"] == "timm"

    marker = Path("/tmp/bit-convert-executed-a-pickle")
    marker.unlink(missing_ok=True)
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"stem.conv.weight": _RunsCode()}, protocol=2))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_to_folder(tmp_path / "evil.pth", tmp_path / "evil")
    assert not marker.exists() and not (tmp_path / "evil").exists()


def test_transformers_folders_round_trip(tmp_path, small_npz, small_arrays):
    first = convert_to_folder(small_npz, tmp_path / "first")
    again = convert_to_folder(first, tmp_path / "again")
    assert load_file(first / "model.safetensors").keys() == load_file(again / "model.safetensors").keys()
    for name, value in load_file(first / "model.safetensors").items():
        assert torch.equal(value, load_file(again / "model.safetensors")[name])
    metadata = json.loads((again / "bit_conversion.json").read_text())
    assert (metadata["source_kind"], metadata["num_labels"]) == ("transformers", 10)
    assert (
        transformers.AutoConfig.from_pretrained(again).id2label
        == transformers.AutoConfig.from_pretrained(first).id2label
    )

    # A folder saved by stock transformers, with TensorFlow "SAME" padding as in google/bit-50.
    stock_config = transformers.BitConfig(
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[1, 1, 2, 1],
        num_labels=3,
        global_padding="SAME",
        embedding_dynamic_padding=True,
        id2label={0: "ant", 1: "bee", 2: "wasp"},
    )
    stock = randomize_(transformers.BitForImageClassification(stock_config)).eval()
    stock.save_pretrained(tmp_path / "stock")
    ours = convert_to_folder(tmp_path / "stock", tmp_path / "ours")
    config = transformers.AutoConfig.from_pretrained(ours)
    assert (config.global_padding, config.embedding_dynamic_padding, config.id2label[2]) == ("SAME", True, "wasp")
    pixels = torch.randn(2, 3, 65, 80)
    with torch.no_grad():
        assert relative_error(our_logits(ours, pixels), stock(pixels).logits) <= 1e-4

    BitModel(BitModel.config_class(**config.to_dict())).save_pretrained(tmp_path / "backbone")  # no head, no prefix
    with pytest.raises(CheckpointError, match="no head"):
        convert_to_folder(tmp_path / "backbone", tmp_path / "headless")
    assert convert_to_folder(tmp_path / "backbone", tmp_path / "headless", num_labels=2).is_dir()


# --- downloads from a loopback server ------------------------------------------------------------------------


class CheckpointServer(http.server.ThreadingHTTPServer):
    """Serves `files` (URL path -> bytes) with Range support; records every request. `cuts[path]` responses to
    that path are cut off halfway through their body (a dropped connection). As a fake Hub (HF_ENDPOINT) it
    answers every /api/models/ query with "repository not found"."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cuts: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, path: str) -> list[str | None]:
        return [byte_range for requested, byte_range in self.requests if requested == path]


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        """No per-request log lines: they would clutter pytest's output."""

    def do_GET(self):
        server: CheckpointServer = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path.startswith("/api/models/"):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')
            return
        if self.path not in server.files:
            self.send_error(404)
            return
        data = server.files[self.path]
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") else 0
        if start >= len(data):  # as RFC 9110 has it: 416, with the file's size
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if server.cuts.get(self.path, 0) > 0:
            server.cuts[self.path] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    yield from serving(CheckpointServer())


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, server) -> Path:
    """An empty Hugging Face cache, and published names pointed at the loopback server."""
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(tmp_path / "hf" / "assets"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("BIT_WEIGHTS_URL", server.url)
    return tmp_path / "hf"


def cached_files(hf_cache: Path) -> list[str]:
    return sorted(p.name for p in hf_cache.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_published_name_downloads_once_into_the_hf_cache(tmp_path, server, hf_cache, r50_bytes, r50_arrays):
    server.files["/BiT-S-R50x1.npz"] = r50_bytes
    first = convert_to_folder("bit-s-r50x1", tmp_path / "first")
    assert server.gets("/BiT-S-R50x1.npz") == [None]
    assert cached_files(hf_cache) == ["BiT-S-R50x1.npz"]

    metadata = json.loads((first / "bit_conversion.json").read_text())
    assert {
        key: metadata[key] for key in ("source", "source_kind", "published_name", "source_url", "source_sha256")
    } == {
        "source": "bit-s-r50x1",
        "source_kind": "published",
        "published_name": "BiT-S-R50x1",
        "source_url": f"{server.url}/BiT-S-R50x1.npz",
        "source_sha256": hashlib.sha256(r50_bytes).hexdigest(),
    }
    assert (metadata["upstream_dataset"], metadata["fine_tuned_on"], metadata["num_labels"]) == (
        "ilsvrc-2012",
        None,
        1000,
    )
    assert metadata["architecture"] == {"depths": list(R50), "width_factor": 1}
    assert relative_error(our_logits(first, PIXELS), reference_logits(r50_arrays, PIXELS)) <= 1e-4

    convert_to_folder("BiT-S-R50x1", tmp_path / "second", num_labels=2)
    assert len(server.requests) == 1  # the cache answered

    with pytest.MonkeyPatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        convert_to_folder("BiT-S-R50x1", tmp_path / "offline")  # cached: fine offline
        with pytest.raises(DownloadError, match=r"HF_HUB_OFFLINE=1.*bit-convert /path/to/BiT-M-R50x1-ILSVRC2012\.npz"):
            convert_to_folder("BiT-M-R50x1-ILSVRC2012", tmp_path / "not-cached")
    assert len(server.requests) == 1 and not (tmp_path / "not-cached").exists()


def test_unreachable_server_fails_fast_with_advice(tmp_path, hf_cache, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("BIT_WEIGHTS_URL", f"http://127.0.0.1:{closed}")
    with pytest.raises(
        DownloadError, match=r"Cannot download .*BiT-M-R101x3\.npz.*bit-convert /path/to/BiT-M-R101x3\.npz"
    ):
        convert_to_folder("BiT-M-R101x3", tmp_path / "out")
    assert cached_files(hf_cache) == [] and not (tmp_path / "out").exists()


def test_dropped_connection_resumes_with_a_range_request(tmp_path, server, hf_cache, r50_bytes, r50_arrays):
    server.files["/BiT-S-R50x1.npz"] = r50_bytes
    server.cuts["/BiT-S-R50x1.npz"] = 1
    folder = convert_to_folder("BiT-S-R50x1", tmp_path / "out")
    half = len(r50_bytes) // 2
    assert server.gets("/BiT-S-R50x1.npz") == [None, f"bytes={half}-"]
    assert (
        json.loads((folder / "bit_conversion.json").read_text())["source_sha256"]
        == hashlib.sha256(r50_bytes).hexdigest()
    )
    assert relative_error(our_logits(folder, PIXELS), reference_logits(r50_arrays, PIXELS)) <= 1e-4


def test_interrupted_download_is_resumed_by_the_next_call(tmp_path, server, hf_cache, small_npz):
    url = f"{server.url}/mirror/small.npz"
    server.files["/mirror/small.npz"] = data = small_npz.read_bytes()
    server.cuts["/mirror/small.npz"] = 100  # every response is cut: this call gives up after a few resumes
    with pytest.raises(DownloadError, match="partial file .* is kept"):
        convert_to_folder(url, tmp_path / "out")
    assert cached_files(hf_cache) == ["small.npz.incomplete"] and not (tmp_path / "out").exists()
    received = next(hf_cache.rglob("small.npz.incomplete")).stat().st_size
    assert len(data) // 2 < received < len(data)

    server.cuts.clear()
    folder = convert_to_folder(url, tmp_path / "out")
    assert server.requests[-1] == ("/mirror/small.npz", f"bytes={received}-")
    assert cached_files(hf_cache) == ["small.npz"]
    assert json.loads((folder / "bit_conversion.json").read_text())["source_kind"] == "url"


def test_a_complete_partial_download_is_used_when_the_server_answers_416(tmp_path, server, hf_cache, small_npz):
    data = small_npz.read_bytes()
    url = f"{server.url}/mirror/small.npz"
    server.files["/mirror/small.npz"] = data
    partial = cached_download_path(url).with_name("small.npz.incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)  # every byte arrived, but the call was stopped before checking the file
    folder = convert_to_folder(url, tmp_path / "out")
    assert server.requests == [("/mirror/small.npz", f"bytes={len(data)}-")]  # answered 416: nothing re-sent
    assert cached_files(hf_cache) == ["small.npz"]
    metadata = json.loads((folder / "bit_conversion.json").read_text())
    assert metadata["source_sha256"] == hashlib.sha256(data).hexdigest()

    # Longer than the file (it changed on the server): not a prefix, so the download restarts from byte 0.
    url = f"{server.url}/changed/small.npz"
    server.files["/changed/small.npz"] = data
    partial = cached_download_path(url).with_name("small.npz.incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data + b"an older, longer version")
    convert_to_folder(url, tmp_path / "again")
    assert server.gets("/changed/small.npz") == [f"bytes={len(data) + 24}-", None]
    assert cached_download_path(url).read_bytes() == data and not partial.exists()


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "wrong architecture"])
def test_damaged_downloads_are_refused_and_never_cached(tmp_path, server, hf_cache, r50_bytes, small_npz, damage):
    served = {
        "truncated": r50_bytes[: len(r50_bytes) * 3 // 5],  # the server's copy is short (Content-Length agrees)
        "corrupt": r50_bytes[:5_000_000] + bytes([r50_bytes[5_000_000] ^ 0xFF]) + r50_bytes[5_000_001:],
        "wrong architecture": small_npz.read_bytes(),  # a valid BiT, but not the R50x1 the name promises
    }[damage]
    server.files["/BiT-S-R50x1.npz"] = served
    with pytest.raises(DownloadError, match="unusable.*discarded and nothing was cached"):
        convert_to_folder("BiT-S-R50x1", tmp_path / "out")
    assert cached_files(hf_cache) == [] and not (tmp_path / "out").exists()


# --- from_pretrained by name ---------------------------------------------------------------------------------


def test_from_pretrained_by_name_converts_once_and_local_or_hub_names_win(tmp_path, server, r50_bytes, r50_arrays):
    server.files["/BiT-S-R50x1.npz"] = r50_bytes
    hf_home = tmp_path / "hf"
    # A cached Hub repository named like a published checkpoint (the Hub cache layout) must win over it.
    snapshot = hf_home / "hub" / "models--BiT-S-R50x3" / "snapshots" / ("0" * 40)
    BitForImageClassification(
        BitForImageClassification.config_class.from_preset("bit-tiny", num_labels=7)
    ).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    # So must a local folder.
    BitForImageClassification(
        BitForImageClassification.config_class.from_preset("bit-tiny", num_labels=4)
    ).save_pretrained(tmp_path / "BiT-S-R101x1")
    torch.save(PIXELS, tmp_path / "pixels.pt")
    code = """
import json, torch, transformers
import modeling_bit
from modeling_bit import BitBackbone, BitForImageClassification, BitModel
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification
x = torch.load("pixels.pt", weights_only=True)
name = "BiT-S-R50x1"
with torch.no_grad():
    logits = BitForImageClassification.from_pretrained("bit-s-r50x1")(x).logits
    auto = AutoModelForImageClassification.from_pretrained(name, num_labels=5, ignore_mismatched_sizes=True)
    base = AutoModel.from_pretrained(name, dtype=torch.bfloat16)
    size = AutoImageProcessor.from_pretrained(name).size
    print("RESULT:" + json.dumps({
        "logits": logits.tolist(),
        "auto": [type(auto).__name__, auto.config.num_labels, auto(x).logits.abs().max().item()],
        "base": [type(base).__name__, str(base.dtype)],
        "backbone": BitBackbone.from_pretrained(name).num_features,
        "processor": [size.height, size.width],
        "hub": BitForImageClassification.from_pretrained("BiT-S-R50x3").config.num_labels,
        "local": BitModel.from_pretrained("BiT-S-R101x1").config.num_labels,
    }))
"""
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_ENDPOINT": server.url,
        "BIT_WEIGHTS_URL": server.url,
        "PYTHONPATH": str(REPO_ROOT),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    env.pop("HF_HUB_OFFLINE", None)
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.split("RESULT:")[-1])

    assert relative_error(torch.tensor(result["logits"]), reference_logits(r50_arrays, PIXELS)) <= 1e-4
    assert result["auto"] == ["BitForImageClassification", 5, 0.0]  # new head: zero-initialised
    assert result["base"] == ["BitModel", "torch.bfloat16"]
    assert result["backbone"] == [64, 256, 512, 1024, 2048]
    assert result["processor"] == [224, 224]
    assert (result["hub"], result["local"]) == (7, 4)
    assert server.gets("/BiT-S-R50x1.npz") == [None]  # downloaded and converted once for all those loads
    assert ("/api/models/bit-s-r50x1", None) in server.requests  # the Hub was asked first
    converted = hf_home / "assets" / "bit-transfer" / "bit_models" / "converted"
    assert [p.relative_to(converted).parts[1:] for p in converted.glob("*/*/model.safetensors")] == [
        ("BiT-S-R50x1", "model.safetensors")
    ]

    offline = subprocess.run(
        [
            sys.executable,
            "-c",
            "import modeling_bit; print(modeling_bit.BitModel.from_pretrained('BiT-S-R50x1').config.hidden_sizes)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert offline.returncode == 0 and "[256, 512, 1024, 2048]" in offline.stdout, offline.stderr
    assert server.gets("/BiT-S-R50x1.npz") == [None]


@pytest.fixture
def fake_hub(hf_cache, server, monkeypatch) -> CheckpointServer:
    """The loopback server as the Hub (it knows no repository), with an empty Hub cache."""
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache / "hub"))
    return server


def test_by_name_the_published_file_is_converted_not_a_folder_named_like_it(
    tmp_path, fake_hub, monkeypatch, r50_bytes, caplog
):
    fake_hub.files["/BiT-S-R50x1.npz"] = r50_bytes
    stray = tmp_path / "work" / "BiT-S-R50x1"  # the canonical spelling, not the name the user types below
    BitForImageClassification(BitForImageClassification.config_class.from_preset("bit-tiny")).save_pretrained(stray)
    monkeypatch.chdir(stray.parent)
    with caplog.at_level(logging.WARNING, logger="modeling_bit.by_name"):
        folder = Path(resolve_pretrained_name("bit-s-r50x1"))
    # One line says what is converted, from where, into where (hundreds of MB for the real checkpoints).
    [said] = [record.getMessage() for record in caplog.records if record.name == "modeling_bit.by_name"]
    assert f"converting {fake_hub.url}/BiT-S-R50x1.npz into {folder}" in said
    metadata = json.loads((folder / "bit_conversion.json").read_text())
    assert (metadata["source_kind"], metadata["architecture"]["depths"]) == ("published", list(R50))
    assert fake_hub.gets("/BiT-S-R50x1.npz") == [None]
    assert resolve_pretrained_name("BiT-S-R50x1") == "BiT-S-R50x1"  # the name typed as the folder: the folder wins


def test_converted_cache_is_per_url_so_mirrors_do_not_alias(tmp_path, fake_hub, monkeypatch, r50_bytes):
    checkpoint = find_published_checkpoint("BiT-S-R50x1")
    fake_hub.files["/a/BiT-S-R50x1.npz"] = fake_hub.files["/b/BiT-S-R50x1.npz"] = r50_bytes
    folders = {}
    for mirror in ("a", "b"):
        monkeypatch.setenv("BIT_WEIGHTS_URL", f"{fake_hub.url}/{mirror}")
        folders[mirror] = converted_published_folder(checkpoint)
        source_url = json.loads((folders[mirror] / "bit_conversion.json").read_text())["source_url"]
        assert source_url == f"{fake_hub.url}/{mirror}/BiT-S-R50x1.npz"
    assert folders["a"] != folders["b"] and folders["a"].name == folders["b"].name == "BiT-S-R50x1"
    monkeypatch.setenv("BIT_WEIGHTS_URL", f"{fake_hub.url}/a")
    assert converted_published_folder(checkpoint) == folders["a"]
    assert [path for path, _ in fake_hub.requests] == ["/a/BiT-S-R50x1.npz", "/b/BiT-S-R50x1.npz"]


def test_local_files_only_never_downloads(tmp_path, fake_hub, r50_bytes):
    fake_hub.files["/BiT-S-R50x1.npz"] = r50_bytes
    with pytest.raises(OSError, match=r"BiT-S-R50x1\.npz is not cached and local_files_only=True forbids .*bit-conv"):
        BitModel.from_pretrained("BiT-S-R50x1", local_files_only=True)
    assert fake_hub.requests == []  # neither the Hub nor the file was asked for

    convert_to_folder("BiT-S-R50x1", tmp_path / "elsewhere")  # downloads into the cache, converts elsewhere
    requests = len(fake_hub.requests)
    model = BitModel.from_pretrained("BiT-S-R50x1", local_files_only=True)  # converts the cached download
    assert model.config.hidden_sizes == [256, 512, 1024, 2048] and len(fake_hub.requests) == requests
