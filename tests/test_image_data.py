"""The one data layer (`image_data`): image cells, unreadable images, splits and columns, the epoch order;
and that fine-tuning and pre-training read data through it alike."""

from __future__ import annotations

import ast
import io

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

import image_data
from finetune.data import load_hub_dataset, load_image_folders
from finetune.errors import FinetuneInputError
from finetune.preprocessing import HyperRuleTrainingStream, PreprocessedImages, preprocess
from image_data import EpochOrder, InputError, UnreadableImage, UnreadableImages, read_image
from pretraining import data as upstream_data


def _png(color, size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_kind_of_image_cell_reads_to_the_same_pixels_and_bad_ones_are_named(tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(_png((200, 10, 10)))
    data = path.read_bytes()
    cells = [
        str(path),
        path,
        data,
        Image.open(path),
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(path)},
    ]
    pixels = [np.asarray(read_image(cell)) for cell in cells]
    assert all(p.shape == (10, 12, 3) and np.array_equal(p, pixels[0]) for p in pixels)
    assert image_data.image_area({"bytes": data, "path": None}) == 120

    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a JPEG")
    truncated = data[: len(data) // 2]
    bad = {
        str(tmp_path / "empty.jpg"): str(tmp_path / "empty.jpg"),
        "notes": {"bytes": None, "path": str(tmp_path / "notes.jpg")},
        "missing": str(tmp_path / "missing.png"),
        "truncated": {"bytes": truncated, "path": None},
        "nothing": {"bytes": None, "path": None},
        "none": None,
    }
    names = {}
    for key, cell in bad.items():
        with pytest.raises(UnreadableImage) as error:
            read_image(cell, index=7)
        names[key] = error.value.name
    assert names["notes"] == str(tmp_path / "notes.jpg") and names["missing"] == str(tmp_path / "missing.png")
    # Bytes without a path are named by their content: the same image has one name wherever it is met.
    assert names["truncated"].startswith("<image bytes ") and names["truncated"] == image_data.image_name(
        {"bytes": truncated, "path": "" or None}
    )
    assert names["truncated"] != image_data.image_name({"bytes": data, "path": None})
    assert names["nothing"] == names["none"] == "example 7"


def _bad_corpus(root):
    for name, color in (("ants", (200, 0, 0)), ("bees", (0, 0, 200))):
        (root / name).mkdir(parents=True)
        for index in range(3):
            (root / name / f"{index}.png").write_bytes(_png(color))
    (root / "ants" / "zero.jpg").write_bytes(b"")
    (root / "bees" / "text.png").write_text("not an image")
    return root, {str(root / "ants" / "zero.jpg"), str(root / "bees" / "text.png")}


def test_both_trainers_skip_name_and_count_unreadable_images_once_per_distinct_image(tmp_path):
    folder, bad = _bad_corpus(tmp_path / "corpus")
    # Fine-tuning: every example read twice (as two epochs would), decoded in memory.
    finetune_data = load_image_folders(folder, validation_fraction=0.25)
    everything = datasets.concatenate_datasets([finetune_data.train, finetune_data.eval])
    twice = datasets.concatenate_datasets([everything, everything])
    in_memory = preprocess(twice, 16)
    assert isinstance(in_memory, PreprocessedImages) and in_memory.unreadable == sorted(bad)
    assert len(in_memory) == 2 * 6
    # Pre-training: the same folder, the same examples twice in one batch; blanks with weight 0 keep the shape.
    source = upstream_data.load_upstream_data(train_dir=str(folder), validation_examples=0)
    builder = upstream_data.BatchBuilder("image", "label", source.labels, 16, 0, train=True)
    items = [(example, (position,)) for position, example in enumerate([*source.train, *source.train])]
    batch = builder(items)
    assert batch["pixel_values"].shape == (16, 3, 16, 16) and int((batch["weights"] == 0).sum()) == 4
    assert sorted(batch["unreadable"]) == sorted([*bad, *bad])  # met twice each ...
    counted = UnreadableImages(batch["unreadable"])
    assert len(counted) == 2 and counted.names() == sorted(bad)  # ... counted once each
    assert counted.summary(shown=1) == f"2 unreadable image(s): {sorted(bad)[0]}, ... (1 more)"


def test_splits_and_columns_are_found_with_one_candidate_list(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "target": datasets.ClassLabel(names=["a", "b"])})
    rows = {"img": [{"bytes": _png((i * 20, 0, 0)), "path": None} for i in range(8)], "target": [0, 1] * 4}
    root = tmp_path / "data"
    root.mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / f"{split}.parquet"))
    source = image_data.load_image_dataset(str(root))
    assert source.validation_split_name() == "test"  # the last of VALIDATION_SPLIT_NAMES, present here
    assert source.validation_split_name(train_split="test") is None
    train = source.split("train")
    assert image_data.find_image_column(train.features) == "img"  # by feature type, not by name
    assert image_data.find_label_column(train.features) == "target"
    with pytest.raises(InputError, match=r"has no split 'val' \(its splits: train, test\): pass --validation-split"):
        source.validation_split_name("val")
    with pytest.raises(InputError, match=r"no column 'image' \(--image-column\); the columns are \['img', 'target'\]"):
        image_data.find_image_column(train.features, "image", "here")
    with pytest.raises(InputError, match=r"the image column 'target' holds ClassLabel"):
        image_data.find_image_column(train.features, "target", "here")
    # Both trainers take the same split and the same columns from it.
    finetune_data = load_hub_dataset(str(root), image_column=None, label_column=None)
    assert finetune_data.source["validation_split"] == "test" and len(finetune_data.eval) == 8
    upstream = upstream_data.load_upstream_data(dataset=str(root))
    assert (upstream.image_column, upstream.label_column, len(upstream.validation)) == ("img", "target", 8)
    # Untyped columns are found by name among the candidates.
    plain = datasets.Features({"jpg": datasets.Value("binary"), "cls": datasets.Value("int64")})
    assert image_data.find_image_column(plain) == "jpg" and image_data.find_label_column(plain) == "cls"
    with pytest.raises(FinetuneInputError, match="could not load it with datasets.load_dataset"):
        load_hub_dataset(str(tmp_path / "nowhere"))


def test_image_folders_are_checked_before_loading(tmp_path):
    (tmp_path / "split" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "split" / "train" / "dog").mkdir(parents=True)
    for name in ("cat", "dog"):
        (tmp_path / "split" / "train" / name / "1.png").write_bytes(_png((1, 2, 3)))
    assert image_data.check_image_folder(tmp_path / "split") == tmp_path / "split"  # split folders hold the classes
    (tmp_path / "one" / "cat").mkdir(parents=True)
    (tmp_path / "one" / "cat" / "1.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "1.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden" / "1.png").write_bytes(_png((1, 2, 3)))
    for folder, message in (
        ("one", r"found one class \('cat'\)"),
        ("loose", "found images but no class subfolders"),
        ("empty", "no image files in"),
        ("nowhere", "is not a folder"),
    ):
        with pytest.raises(
            InputError, match=f"--train-dir must be a folder with one subfolder of images per class.*{message}"
        ):
            image_data.check_image_folder(tmp_path / folder)


def test_one_seeded_epoch_order_for_both_trainers():
    order = EpochOrder(10, seed=3)
    first, second = [order.index_of(p) for p in range(10)], [order.index_of(p) for p in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert first == list(np.random.default_rng([3, 0]).permutation(10))  # (seed, epoch), as the order always was
    assert [order.index_of(p) for p in (25, 5)] == [order.permutation(2)[5], first[5]]  # any position, any order
    salted = EpochOrder(10, seed=3, salt=(0,))
    assert [salted.index_of(p) for p in range(10)] == list(np.random.default_rng([3, 0, 0]).permutation(10))
    # Pre-training reads positions through it; fine-tuning's HyperRule stream too (salt 0: its crops use salt 1).
    assert [upstream_data.EpochStream(list(range(10)), seed=3).index_of(p) for p in range(20)] == first + second
    labels = torch.arange(10)
    source = PreprocessedImages(labels.view(10, 1, 1, 1).float().expand(10, 3, 4, 4), labels, [])
    stream = HyperRuleTrainingStream(source, 20, crop=4, seed=3, flip=False, random_crop=False)
    assert [int(stream[p]["labels"]) for p in range(20)] == [salted.index_of(p) for p in range(20)]


def test_the_data_layer_imports_no_trainer_and_the_model_package_not_it():
    def imported(package: str) -> set[str]:
        names = set()
        for path in (REPO_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
        return names

    assert not imported("image_data") & {"finetune", "pretraining", "model_cards"}
    assert "image_data" not in imported("modeling_bit")
    assert "finetune" not in imported("pretraining")  # fine-tuning uses pre-training's checkpoint, not the reverse
