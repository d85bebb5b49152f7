"""bit-vtab: the task registry, VTAB's label derivations, the whole runner offline, results, card and bad input.

The 19 real datasets need the network; here the runner runs end to end on local tasks built from real images
(hymenoptera photos, scikit-learn's digits) and on generated stand-ins for one task of each group, written in the
format of the task's registry source (clip-benchmark's WebDataset shards: `webp` images, `cls` labels) and run with
the registry row's own label rule, splits and flip/crop switches.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import TrainerCallback

from finetune.hyperrule import NO_CROP_TASKS, NO_FLIP_TASKS
from vtab import cli
from vtab.data import FINAL, SELECTION, load_prepared
from vtab.labels import (
    CLEVR_DISTANCE_THRESHOLDS,
    KITTI_DISTANCE_THRESHOLDS,
    LabelRule,
    binned_attribute,
    clevr_count,
    clevr_distance,
    kitti_vehicle_distance,
)
from vtab.registry import GROUPS, REGISTRY, VtabTask, list_tasks, registry_task, select_tasks, task_key

# Tiny CPU runs: 2 steps of 8 images at 32 px, no decoding workers.
SMALL_RUN = [
    "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "8", "--resolution", "40", "32",
    "--num-workers", "0",
]  # fmt: skip
ISSUE_TASK_NAMES = {
    "natural": ["Caltech101", "CIFAR-100", "DTD", "Flowers102", "Pets", "Sun397", "SVHN"],
    "specialized": ["Patch Camelyon", "EuroSAT", "Resisc45", "Retinopathy"],
    "structured": [
        "Clevr count", "Clevr distance", "DMLab", "KITTI distance", "dSprites location", "dSprites orientation",
        "SmallNORB azimuth", "SmallNORB elevation",
    ],
}  # fmt: skip


# --- Label derivations on hand-made examples ------------------------------------------------------------------


def vtab_threshold_bin(value: float, thresholds) -> int:
    """task_adaptation's own expression: reduce_max(where((thrs - value) < 0)), in numpy."""
    return int(np.max(np.where((np.asarray(thresholds) - value) < 0)))


def test_object_counts_distance_bins_and_angle_bins_follow_vtab():
    # A CLEVR scene of five objects (datasets' dict-of-lists form and a list of per-object dicts): label 5 - 3.
    scene = {"pixel_coords": [[10, 20, 12.0], [40, 22, 8.7], [70, 30, 9.9], [90, 50, 11.2], [120, 60, 10.4]]}
    assert clevr_count(scene) == 2
    assert clevr_count([{"pixel_coords": coords} for coords in scene["pixel_coords"]]) == 2
    # Closest object at depth 8.7: between the thresholds 8.5 and 9 -> bin 2.
    assert clevr_distance(scene) == 2
    assert (
        clevr_distance({"pixel_coords": [[0, 0, 7.5]]}) == 0 and clevr_distance({"pixel_coords": [[0, 0, 10.5]]}) == 5
    )
    # KITTI: a car at 25 m, a pedestrian at 3 m (not a vehicle), a truck at 12 m -> closest vehicle 12 m: bin 1 (8-20).
    street = {"type": [0, 3, 2], "location": [[1.0, 1.5, 25.0], [0.5, 1.5, 3.0], [-2.0, 1.5, 12.0]]}
    assert kitti_vehicle_distance(street) == 1
    assert kitti_vehicle_distance({"type": [3], "location": [[0.0, 0.0, 3.0]]}) == 3  # no vehicle
    assert kitti_vehicle_distance({"type": [1], "location": [[0.0, 0.0, 5.6]]}) == 0
    assert kitti_vehicle_distance({"type": [0], "location": [[0.0, 0.0, 30.0]]}) == 2
    # dSprites orientation: 40 angles into 16 bins of 2.5; position: 32 into 16 bins of 2.
    assert [binned_attribute(angle, source_classes=40, classes=16) for angle in (0, 2, 3, 4, 5, 39)] == [
        0,
        0,
        1,
        1,
        2,
        15,
    ]
    assert [binned_attribute(x, source_classes=32, classes=16) for x in (0, 1, 2, 31)] == [0, 0, 1, 15]


def test_derivations_equal_vtab_arithmetic_over_their_whole_range():
    for depth in np.linspace(0.05, 99.95, 2000):
        assert clevr_distance({"pixel_coords": [[0, 0, depth]]}) == vtab_threshold_bin(
            depth, CLEVR_DISTANCE_THRESHOLDS
        )
    for depth in np.linspace(-99.0, 60.0, 2000):
        expected = vtab_threshold_bin(depth, KITTI_DISTANCE_THRESHOLDS)
        assert kitti_vehicle_distance({"type": [0], "location": [[0.0, 0.0, depth]]}) == expected
    for source_classes in (32, 40):
        # dsprites.py: floor(float32(value) / (source_classes / 16)), cast back to an integer.
        factor = np.float32(source_classes / 16)
        expected = [int(np.floor(np.float32(value) / factor)) for value in range(source_classes)]
        assert [
            binned_attribute(value, source_classes=source_classes, classes=16) for value in range(source_classes)
        ] == expected
    rule = registry_task("dSprites/orientation").label
    assert rule.label(39) == 15 and rule.class_names() == [str(index) for index in range(16)]
    with pytest.raises(ValueError, match="outside 0..39"):
        rule.label(40)


# --- The registry ---------------------------------------------------------------------------------------------


def test_registry_has_the_19_tasks_with_appendix_b_switches_and_round_trips():
    assert len(REGISTRY) == 19
    for group, names in ISSUE_TASK_NAMES.items():
        assert [task.name for task in select_tasks([group])] == [registry_task(name).name for name in names]
    assert [task.group for task in REGISTRY] == sorted((task.group for task in REGISTRY), key=GROUPS.index)
    # Appendix B's exceptions are named as registry tasks (a renamed entry would silently re-enable an augmentation).
    assert {registry_task(name).name for name in NO_FLIP_TASKS} == set(NO_FLIP_TASKS)
    assert {registry_task(name).name for name in NO_CROP_TASKS} == set(NO_CROP_TASKS)
    for task in REGISTRY:
        assert task.flip == (task.name not in NO_FLIP_TASKS) and task.crop == (task.name not in NO_CROP_TASKS)
        assert task.citation.startswith("google-research/task_adaptation ") and task.source.dataset in task.citation
        assert VtabTask.from_dict(json.loads(json.dumps(task.to_dict())), where="round trip") == task
        assert task.confirmed or task.note
    assert {task.name for task in REGISTRY if not task.confirmed} == {"DTD", "Flowers102", "Sun397", "KITTI/distance"}
    # Each task once, in table order.
    natural = [task.name for task in REGISTRY if task.group == "natural"]
    assert [task.name for task in select_tasks(["clevr COUNT", "cifar100", "natural"])] == [*natural, "Clevr/count"]


def test_list_tasks_prints_one_line_per_task_and_help_marks_the_unconfirmed(capsys):
    assert cli.main(["--list-tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "group", "source", "label", "flip", "crop"]
    rows = lines[1:20]
    for task, row in zip(REGISTRY, rows):
        assert row.startswith(task.name) and task.group in row and task.source.dataset in row
        assert ("no flip" in row) != task.flip and ("no crop" in row) != task.crop
        assert ("(unconfirmed)" in row) != task.confirmed
    assert "objects - 3" in rows[11] and "32 values binned into 16" in rows[15]
    assert lines[20] == "" and all(line.startswith("unconfirmed: ") for line in lines[21:]) and len(lines) == 25
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    assert "DTD*" in help_text and "KITTI/distance*" in help_text and "Sources marked * are unconfirmed" in help_text
    assert "--bf16" in help_text and "--max-steps" in help_text  # bit-finetune's and the Trainer's flags


# --- Local tasks: generated stand-ins and real images -------------------------------------------------------------


def encode(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **({"lossless": True} if kind == "WEBP" else {}))
    return buffer.getvalue()


def write_webdataset(root: Path, splits: dict[str, list[tuple[bytes, int]]]) -> Path:
    """clip-benchmark's layout: ROOT/<split>/0.tar of sNNNNNNN.webp + sNNNNNNN.cls."""
    for split, examples in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / split / "0.tar", "w") as tar:
            for index, (image, label) in enumerate(examples):
                for extension, data in (("webp", image), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{index:07d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def svhn_like_digits(start: int, count: int) -> list[tuple[bytes, int]]:
    """scikit-learn's digits (real handwriting, 8x8) as 16x16 RGB WebP images with their digit (SVHN stand-in)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))[start : start + count]
    examples = []
    for index in order:
        pixels = (digits.images[index] * 255 / 16).astype(np.uint8)
        image = Image.fromarray(pixels).resize((16, 16), Image.BILINEAR).convert("RGB")
        examples.append((encode(image, "WEBP"), int(digits.target[index])))
    return examples


def stripes(count: int, rng, size: int = 16) -> list[tuple[bytes, int]]:
    """Horizontal (0) or vertical (1) stripes (PatchCamelyon stand-in: two texture classes)."""
    examples = []
    for _ in range(count):
        label = int(rng.integers(2))
        wave = (np.sin(np.arange(size) * 1.3 + rng.uniform(0, 6)) > 0) * 160 + 40
        pixels = np.tile(wave[:, None], (1, size)) if label == 0 else np.tile(wave[None, :], (size, 1))
        pixels = np.repeat(pixels[..., None], 3, axis=2).astype(np.uint8)
        examples.append((encode(Image.fromarray(pixels), "WEBP"), label))
    return examples


def sprites(count: int, rng, size: int = 32) -> tuple[list[tuple[bytes, int]], list[int]]:
    """dSprites stand-in: a white square on black at one of 32 x positions; `cls` stores the raw position (as the
    clip-benchmark export does), so the registry's label is position // 2."""
    examples, positions = [], []
    for _ in range(count):
        position = int(rng.integers(32))
        pixels = np.zeros((size, size), np.uint8)
        left, top = round(position * (size - 4) / 31), int(rng.integers(0, size - 4))
        pixels[top : top + 4, left : left + 4] = 255
        examples.append((encode(Image.fromarray(pixels).convert("RGB"), "WEBP"), position))
        positions.append(position)
    return examples, positions


def write_image_folder(root: Path, images: dict[str, list[tuple[str, Image.Image]]]) -> Path:
    for split, items in images.items():
        for index, (label, image) in enumerate(items):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:05d}.png")
    return root


def hymenoptera_tiles(root: Path, hymenoptera: Path) -> Path:
    """Real photos of ants and bees cut into small tiles: 5 per training photo (1,200+), 1 per validation photo; plus
    one unreadable test image (a real photo's file cut short)."""
    split_images = {"train": [], "test": []}
    for split, source, tiles in (("train", "train", 5), ("test", "val", 1)):
        for label in ("ants", "bees"):
            for path in sorted((hymenoptera / source / label).glob("*.jpg")):
                with Image.open(path) as photo:
                    photo.draft("RGB", (96, 96))  # JPEG decoded at reduced scale: only 48 px are kept
                    photo = photo.convert("RGB").resize((48, 48), Image.BILINEAR)
                for tile in range(tiles):
                    left, top = (tile * 7) % 24, (tile * 11) % 24
                    split_images[split].append((label, photo.crop((left, top, left + 24, top + 24))))
    write_image_folder(root, split_images)
    photo = sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[0]
    (root / "test" / "ants" / "truncated.jpg").write_bytes(photo.read_bytes()[:2000])
    return root


def stand_in(name: str, folder: Path) -> dict:
    """The registry row of `name` reading a local copy at `folder` instead of its Hub dataset."""
    task = registry_task(name)
    return dataclasses.replace(task, source=dataclasses.replace(task.source, dataset=str(folder))).to_dict()


def image_folder_task(name: str, group: str, folder: Path, classes: int, **fields) -> dict:
    return {
        "name": name,
        "group": group,
        "source": {"dataset": "imagefolder", "data_dir": str(folder), "test": "test", "shuffle_seed": 0},
        "label": {"derivation": "class", "column": "label", "classes": classes},
        **fields,
    }


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory, hymenoptera_dir) -> dict:
    root = tmp_path_factory.mktemp("vtab-data")
    rng = np.random.default_rng(0)
    sprite_train, positions = sprites(1000, rng)
    sprite_test, _ = sprites(60, rng)
    tasks = [
        stand_in("SVHN", write_webdataset(root / "svhn", {"train": svhn_like_digits(0, 1000), "test": svhn_like_digits(1000, 60)})),
        stand_in("PatchCamelyon", write_webdataset(root / "pcam", {"train": stripes(1000, rng), "test": stripes(60, rng)})),
        stand_in("dSprites/location", write_webdataset(root / "dsprites", {"train": sprite_train, "test": sprite_test})),
        image_folder_task("Hymenoptera tiles", "insects", hymenoptera_tiles(root / "tiles", hymenoptera_dir), 2, citation="hymenoptera photos"),
    ]  # fmt: skip
    task_file = root / "tasks.json"
    task_file.write_text(json.dumps({"tasks": tasks}, indent=2))
    return {"file": task_file, "root": root, "positions": positions, "names": [task["name"] for task in tasks]}


class InterruptAtTask(TrainerCallback):
    """Raises KeyboardInterrupt after the first optimizer step of the n-th task trained in this process."""

    def __init__(self, task: int):
        self.task, self.started = task, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.started == self.task:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def vtab_run(tmp_path_factory, tiny_checkpoint, local_tasks) -> dict:
    """The whole runner over the four local tasks: interrupted in the third task, then continued with --resume."""
    output = tmp_path_factory.mktemp("vtab-run") / "out"
    # One intra-op thread, as the main job runs: two threads of this tiny network competing with other processes on
    # two cores are several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = [
        "--model",
        str(tiny_checkpoint),
        "--output-dir",
        str(output),
        "--task-file",
        str(local_tasks["file"]),
        *SMALL_RUN,
    ]
    first_status = cli.main(argv, callbacks=[InterruptAtTask(3)])
    after_interrupt = json.loads((output / "vtab_results.json").read_text())
    weights = {
        name: (output / "tasks" / name / "model.safetensors").stat().st_mtime_ns for name in ("svhn", "patchcamelyon")
    }
    status = cli.main([*argv, "--resume"])
    torch.set_num_threads(threads)
    return {
        "output": output,
        "argv": argv,
        "first_status": first_status,
        "after_interrupt": after_interrupt,
        "weights": weights,
        "status": status,
    }


def test_the_runner_resumes_without_rerunning_finished_tasks(vtab_run):
    output = vtab_run["output"]
    assert vtab_run["first_status"] == 130 and vtab_run["status"] == 0
    assert list(vtab_run["after_interrupt"]["tasks"]) == ["SVHN", "PatchCamelyon"]
    assert vtab_run["after_interrupt"]["missing_tasks"] == ["dSprites/location", "Hymenoptera tiles"]
    for name, mtime in vtab_run["weights"].items():
        assert (output / "tasks" / name / "model.safetensors").stat().st_mtime_ns == mtime  # not rerun
    results = json.loads((output / "vtab_results.json").read_text())
    assert list(results["tasks"]) == ["SVHN", "PatchCamelyon", "dSprites/location", "Hymenoptera tiles"]
    for name in ("SVHN", "PatchCamelyon"):
        assert results["tasks"][name] == vtab_run["after_interrupt"]["tasks"][name]


def test_results_per_task_group_and_mean_and_the_task_folders(vtab_run, local_tasks):
    output = vtab_run["output"]
    results = json.loads((output / "vtab_results.json").read_text())
    tasks = results["tasks"]
    for result in tasks.values():
        folder = output / result["folder"]
        assert json.loads((folder / "eval_results.json").read_text())["eval_accuracy"] == result["accuracy"]
        assert {"config.json", "model.safetensors", "README.md", "bit_hyperrule.json"} <= {
            p.name for p in folder.iterdir()
        }
        assert result["num_train_examples"] == 1000
        assert result["evaluation_split"] == "test"
    assert tasks["Hymenoptera tiles"]["unreadable_images"] == 1 and tasks["SVHN"]["unreadable_images"] == 0
    assert [tasks[name]["num_eval_examples"] for name in ("SVHN", "Hymenoptera tiles")] == [60, 153]
    groups = {
        group: [r["accuracy"] for r in tasks.values() if r["group"] == group]
        for group in ("natural", "specialized", "structured", "insects")
    }
    assert list(results["groups"]) == list(groups)
    for group, accuracies in groups.items():
        assert results["groups"][group] == {
            "mean": pytest.approx(float(np.mean(accuracies))),
            "tasks": len(accuracies),
        }
    assert results["mean"] == pytest.approx(float(np.mean([r["accuracy"] for r in tasks.values()])))
    assert "vtab_1k_score" not in results and results["missing_tasks"] == []
    # The task's Appendix B switches reach the rule: dSprites/location trains without flips and crops.
    for name, flip, crop in (
        ("dsprites-location", False, False),
        ("svhn", True, True),
        ("hymenoptera-tiles", True, True),
    ):
        rule = json.loads((output / "tasks" / name / "bit_hyperrule.json").read_text())
        assert (rule["horizontal_flip"], rule["random_crop"], rule["steps"], rule["crop"]) == (flip, crop, 2, 32)
        # The task's own rule (Appendix B), not an override of it.
        assert not {"horizontal_flip", "random_crop"} & set(rule["overrides"])


def test_prepared_data_has_the_registry_labels_and_both_protocols(vtab_run, local_tasks):
    output = vtab_run["output"]
    task = VtabTask.from_dict(stand_in("dSprites/location", local_tasks["root"] / "dsprites"), where="test")
    prepared = load_prepared(task, output / "data" / "dsprites-location")
    assert prepared is not None and prepared.label_names == [str(index) for index in range(16)]
    labels = list(prepared.parts["train"]["label"]) + list(prepared.parts["validation"]["label"])
    assert labels == [position // 2 for position in local_tasks["positions"]]  # the registry's bin, in source order
    final, selection = prepared.data(FINAL), prepared.data(SELECTION)
    assert (len(final.train), len(final.eval), len(selection.train), len(selection.eval)) == (1000, 60, 800, 200)
    assert list(selection.eval["label"]) == labels[800:]
    record = json.loads((output / "data" / "hymenoptera-tiles" / "task.json").read_text())
    assert record["unreadable"] == {
        "train": [],
        "validation": [],
        "test": [str(local_tasks["root"] / "tiles" / "test" / "ants" / "truncated.jpg")],
    }


def test_the_card_lists_every_task_accuracy_and_the_plot_and_table_exist(vtab_run, capsys):
    output = vtab_run["output"]
    results = json.loads((output / "vtab_results.json").read_text())
    card = ModelCard.load(output / "README.md")
    entries = {entry.dataset_name: entry for entry in card.data.eval_results}
    # Registry tasks are named as VTAB-1k's; an own task keeps its name.
    names = {name: name if name == "Hymenoptera tiles" else f"{name} (VTAB-1k)" for name in results["tasks"]}
    assert set(entries) == set(names.values())
    for name, result in results["tasks"].items():
        entry = entries[names[name]]
        assert (entry.metric_type, entry.metric_value, entry.dataset_split) == ("accuracy", result["accuracy"], "test")
    # Local data is named by the task (its path means nothing on the Hub); each task is its own model-index entry.
    assert [entries[names[name]].dataset_type for name in results["tasks"]] == [
        "svhn", "patchcamelyon", "dsprites-location", "hymenoptera-tiles"
    ]  # fmt: skip
    text = (output / "README.md").read_text()
    assert "| **mean** (4 tasks) |" in text and "![" in text and "/tmp" not in text.split("## Limitations")[0]
    assert Image.open(output / "vtab_accuracy.png").format == "PNG"
    assert f"| **specialized** mean (1 task) | | **{100 * results['groups']['specialized']['mean']:.2f}%** |" in text


# --- Bad input: refused before any training ----------------------------------------------------------------------


def test_bad_input_is_refused_before_any_training(tmp_path, tiny_checkpoint, local_tasks, hymenoptera_dir, capsys):
    base = ["--model", str(tiny_checkpoint), *SMALL_RUN]
    assert cli.main([*base, "--output-dir", str(tmp_path / "a"), "--tasks", "natural", "Clevr/cnt"]) == 2
    assert "--tasks 'Clevr/cnt': no such task" in capsys.readouterr().err
    # A good task first, then one with fewer than 1,000 training examples (the real hymenoptera folder): nothing trains.
    tasks = [
        stand_in("SVHN", local_tasks["root"] / "svhn"),
        image_folder_task("Hymenoptera", "natural", hymenoptera_dir, 2),
    ]
    tasks[1]["source"]["test"] = "validation"
    task_file = tmp_path / "tasks.json"
    task_file.write_text(json.dumps(tasks))
    output = tmp_path / "b"
    assert cli.main([*base, "--output-dir", str(output), "--task-file", str(task_file)]) == 2
    error = capsys.readouterr().err
    assert "task Hymenoptera:" in error and "VTAB-1k needs 1,000 training examples" in error
    assert not (output / "tasks").exists() and not (output / "vtab_results.json").exists()
    # A label the derivation cannot give (a raw dSprites position beyond the 32), named with its example.
    blank = encode(Image.new("RGB", (8, 8)), "WEBP")
    bad = write_webdataset(tmp_path / "bad-dsprites", {"train": [(blank, 40)] * 1000, "test": [(blank, 0)]})
    task_file.write_text(json.dumps([stand_in("dSprites/location", bad)]))
    assert cli.main([*base, "--output-dir", str(tmp_path / "c"), "--task-file", str(task_file)]) == 2
    assert "example train[0]" in capsys.readouterr().err
    task_file.write_text(json.dumps([{**tasks[0], "flips": False}]))
    assert cli.main([*base, "--output-dir", str(tmp_path / "d"), "--task-file", str(task_file)]) == 2
    assert "task 1: unknown field(s) ['flips']" in capsys.readouterr().err


def test_a_resume_with_other_settings_is_refused_naming_them(vtab_run, capsys):
    argv = [*vtab_run["argv"], "--resume", "--learning-rate", "0.01"]
    assert cli.main(argv) == 2
    assert "rule_overrides (was" in capsys.readouterr().err
    assert cli.main(vtab_run["argv"]) == 2  # no --resume: the finished run is not silently replaced
    assert "pass --resume" in capsys.readouterr().err


def test_an_unreachable_source_names_the_task_and_says_offline(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    output = tmp_path / "o"
    assert cli.main(["--model", str(tiny_checkpoint), "--output-dir", str(output), "--tasks", "DTD", "Pets"]) == 2
    error = capsys.readouterr().err
    assert "task DTD: cannot read train[:800] of clip-benchmark/wds_vtab-dtd: offline?" in error
    assert "HF_HUB_OFFLINE is set" in error and "Traceback" not in error
    assert not (output / "tasks").exists()


def test_task_names_match_loosely_and_task_files_replace_registry_rows(local_tasks):
    assert task_key("Patch Camelyon") == task_key("patchcamelyon") == task_key("PATCH-camelyon")
    own = [VtabTask.from_dict(stand_in("SVHN", local_tasks["root"] / "svhn"), where="test")]
    chosen = select_tasks(["natural"], own)
    assert [task.name for task in chosen] == [task.name for task in REGISTRY if task.group == "natural"]
    assert chosen[-1] is own[0] and chosen[-1].source.is_local
    assert "SVHN" in list_tasks(own) and LabelRule("bin", "cls", 16, {"source_classes": 32}).label(31) == 15
