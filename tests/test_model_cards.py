"""Model cards and Hub-ready folders: every kind of folder bit-transfer produces, its card, and the Hub path.

Cards are parsed back with huggingface_hub's `ModelCard.load`; plots are opened as images; the usage code in each
card and the inference widget's `pipeline("image-classification")` run in a fresh interpreter that never imports
bit-transfer, and must agree with our own classes on real photographs. The Hub is a loopback HTTP server that
speaks the part of the Hub API that `huggingface_hub` uses to list, create, upload and download, and keeps what it
receives, so pushes are checked byte for byte with the real client.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, randomize_, run_clean_python, serving
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils.sha import git_hash
from PIL import Image
from published_layout import published_arrays, write_npz
from transformers import AutoImageProcessor

from model_cards import CardOptions, prepare_hub_folder, write_card, write_model_card
from model_cards.bit_convert import convert_with_card
from model_cards.bit_convert import main as bit_convert
from model_cards.card import checked_eval_result
from model_cards.cli import main as bit_model_card
from model_cards.facts import CardError
from model_cards.hub import HubPushError, local_files, push_folder
from modeling_bit import BitConfig, BitForImageClassification, bit_image_processor, load_rgb_image

SMALL_DEPTHS = (1, 2, 1, 1)
R50_DEPTHS = (3, 4, 6, 3)
KINDS = ("converted", "fine-tuned", "pretrained", "saved")


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2))


def save_tiny(folder: Path, labels: list[str], resolution: int, seed: int, **config) -> Path:
    config = BitConfig.from_preset(
        "bit-tiny", id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}, **config
    )
    randomize_(BitForImageClassification(config), seed).save_pretrained(folder)
    bit_image_processor(resolution).save_pretrained(folder)
    return folder


def write_finetuned_records(folder: Path, hymenoptera: Path, *, validation: bool = True, dataset: dict | None = None):
    """A fine-tuned folder's records, as bit-finetune writes them: 5-shot, 3 trials."""
    source = dataset or {
        "train_dir": str(hymenoptera / "train"),
        **({"validation_dir": str(hymenoptera / "val")} if validation else {}),
    }
    write_json(
        folder / "bit_hyperrule.json",
        {
            "dataset_size": 10,
            "median_image_area": 187500.0,
            "precrop": 80,
            "crop": 64,
            "steps": 6,
            "warmup_steps": 1,
            "decay_steps": [2, 4, 5],
            "mixup_alpha": 0.0,
            "learning_rate": 0.00017578125,
            "batch_size": 30,
            "micro_batch_size": 10,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "overrides": ["precrop", "crop", "steps", "batch_size"],
        },
    )
    trials = [0.55, 0.6209, 0.7]
    write_json(
        folder / "eval_results.json",
        {
            "eval_loss": 0.6812,
            "eval_accuracy": 0.6209,
            "eval_accuracy_min": 0.55,
            "eval_accuracy_max": 0.7,
            "eval_accuracy_trials": trials,
            "eval_top_5_accuracy": 1.0,
            "eval_runtime": 1.2,
        },
    )
    write_json(
        folder / "all_results.json",
        {"train_loss": 0.69, "eval_accuracy": 0.6209, "unreadable_images": 0, "saved_trial": 2},
    )
    write_json(
        folder / "bit_finetune_args.json",
        {
            "command": [
                "bit-finetune",
                "--model",
                "BiT-M-R50x1",
                "--train-dir",
                source.get("train_dir", "x"),
                "--output-dir",
                str(folder),
                "--examples-per-class",
                "5",
                "--trials",
                "3",
            ],
            "model": "BiT-M-R50x1",
            "dataset": {
                **source,
                "num_train_examples": 10,
                "num_eval_examples": 153,
                "num_classes": 2,
                "examples_per_class": 5,
                "trials": 3,
            },
        },
    )
    write_json(
        folder / "training_log.json",
        {
            "log_history": [
                {"loss": 0.6931, "learning_rate": 0.00017578125, "epoch": 0.5, "step": 2},
                {"loss": 0.6502, "learning_rate": 1.7578125e-05, "epoch": 1.0, "step": 4},
                {"train_runtime": 3.1, "train_loss": 0.67, "epoch": 1.5, "step": 6},
            ]
        },
    )


def write_pretrained_records(folder: Path, train_dir: Path):
    """A pre-trained folder's records, as pretrain.py writes them, multi-label."""
    write_json(
        folder / "bit_pretraining.json",
        {
            # sys.argv under `accelerate launch`: the script's absolute path, then the arguments.
            "command": [
                "/opt/src/bit-transfer/pretraining/pretrain.py",
                "--model-preset",
                "bit-tiny",
                "--train-dir",
                str(train_dir),
                "--output-dir",
                "O",
                "--max-steps",
                "8",
            ],
            "recipe": {
                "schedule": "bit-s-m",
                "base_learning_rate": 0.03,
                "global_batch_size": 8,
                "weight_decay": 0.0001,
                "momentum": 0.9,
                "warmup_steps": 2,
                "image_size": 32,
            },
            "dataset": {"train_dir": str(train_dir), "num_examples": 245, "num_classes": 3, "multi_label": True},
            "steps": 8,
            "global_batch_size": 8,
            "final_loss": 0.4123,
            "num_processes": 2,
            "bit_transfer_version": "0.1.0",
        },
    )
    (folder / "training_log.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "step": step,
                    "loss": 0.7 - 0.03 * step,
                    "learning_rate": 0.00094 * min(step, 2) / 2,
                    "images_per_second": 40.0,
                    "epoch": None,
                }
            )
            + "\n"
            for step in range(1, 9)
        )
    )
    write_json(
        folder / "probe_results.json",
        [
            {
                "step": step,
                "examples_per_class": k,
                "accuracy": 0.4 + 0.02 * step + 0.03 * k,
                "num_classes": 3,
                "num_test_examples": 30,
                "trials": 5,
            }
            for step in (4, 8)
            for k in (1, 5)
        ],
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory, hymenoptera_dir) -> dict[str, Path]:
    """One folder of every kind we produce, each with its card (written as its producer writes it)."""
    root = tmp_path_factory.mktemp("kinds")
    npz = write_npz(root / "small.npz", published_arrays(SMALL_DEPTHS, num_classes=10, seed=3))
    converted = convert_with_card(npz, root / "converted", resolution=64)

    finetuned = save_tiny(root / "finetuned", ["ants", "bees"], 64, seed=1)
    write_finetuned_records(finetuned, hymenoptera_dir)
    write_model_card(finetuned)

    pretrained = save_tiny(
        root / "pretrained", ["ant", "bee", "flower"], 32, seed=2, problem_type="multi_label_classification"
    )
    write_pretrained_records(pretrained, hymenoptera_dir / "train")
    write_model_card(pretrained)

    saved = save_tiny(root / "saved", ["a", "b", "c", "d", "e", "f", "g"], 48, seed=4)
    write_model_card(saved)
    return {"converted": converted, "fine-tuned": finetuned, "pretrained": pretrained, "saved": saved}


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def python_blocks(card_text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.S)


def assert_honest_text(text: str) -> None:
    """No missing value shown as one, and no table without rows."""
    assert not re.search(r"\b(None|nan|NaN|null|undefined)\b", text)
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if re.fullmatch(r"\|(---\|)+", line):
            assert index + 1 < len(lines) and lines[index + 1].startswith("|"), f"empty table at line {index}"


# --- metadata -------------------------------------------------------------------------------------------------


def test_cards_of_every_kind_parse_back_with_their_metadata(folders, hymenoptera_dir):
    for kind in KINDS:
        data = card_of(folders[kind]).data
        assert data.library_name == "transformers" and data.pipeline_tag == "image-classification", kind
        assert {"bit", "resnetv2", "image-classification"} <= set(data.tags), kind
        assert data.get("license") is None, kind  # nothing here is published BiT weights: no licence invented
        assert data.get("base_model") is None, kind  # BiT-M-R50x1 is a published name, not a Hub repository

    assert card_of(folders["converted"]).data.eval_results is None  # nothing was measured
    assert card_of(folders["saved"]).data.eval_results is None

    finetuned = card_of(folders["fine-tuned"]).data
    assert "few-shot" in finetuned.tags
    records = json.loads((folders["fine-tuned"] / "eval_results.json").read_text())
    # Top-5 accuracy of a 2-class model is 100% by construction: recorded, but not reported.
    [median] = finetuned.eval_results
    assert (median.metric_type, median.metric_name, median.metric_value) == (
        "accuracy",
        "Accuracy (median of 3 fine-tuning trials, 5 examples per class)",
        records["eval_accuracy"],
    )
    assert (median.task_type, median.dataset_type, median.dataset_name, median.dataset_split) == (
        "image-classification",
        "imagefolder",
        "hymenoptera (image folder)",
        "validation",
    )

    pretrained = card_of(folders["pretrained"]).data
    assert "multi-label" in pretrained.tags
    final = {
        r["examples_per_class"]: r["accuracy"]
        for r in json.loads((folders["pretrained"] / "probe_results.json").read_text())
        if r["step"] == 8
    }
    assert {int(r.metric_name.split("-")[0]): r.metric_value for r in pretrained.eval_results} == final
    assert {(r.dataset_type, r.dataset_split) for r in pretrained.eval_results} == {("imagefolder", "validation")}
    assert {r.dataset_name for r in pretrained.eval_results} == {"hymenoptera (image folder)"}


def test_card_sections_are_filled_from_the_records_and_say_nothing_missing(folders):
    for kind in KINDS:
        text = (folders[kind] / "README.md").read_text()
        assert_honest_text(text)
        assert_no_local_paths(text, folders[kind].parent)
        for heading in (
            "## Architecture",
            "## How it was produced",
            "## Results",
            "## Usage",
            "## Limitations and biases",
            "## Citation",
            "@inproceedings{kolesnikov2020bit",
        ):
            assert heading in text, (kind, heading)

    finetuned = (folders["fine-tuned"] / "README.md").read_text()
    # The recorded command, with absolute paths shortened to what they name.
    assert (
        "bit-finetune --model BiT-M-R50x1 --train-dir hymenoptera/train --output-dir finetuned "
        "--examples-per-class 5 --trials 3"
    ) in finetuned
    assert "Evaluation on the local image folder `hymenoptera/val`" in finetuned
    assert "| optimizer steps | 6 | given |" in finetuned and "| SGD momentum | 0.9 | BiT-HyperRule |" in finetuned
    assert "| 5 | 3 | 62.09% | 55.00% | 70.00% |" in finetuned  # examples per class, trials, median, min, max
    assert "| 2 | 62.09% | yes |" in finetuned  # the saved trial

    pretrained = (folders["pretrained"] / "README.md").read_text()
    # As the user reruns it: the launcher (two processes recorded) and the script's path in the repository.
    assert (
        "```bash\naccelerate launch --multi_gpu --num_processes 2 pretraining/pretrain.py --model-preset bit-tiny "
        "--train-dir hymenoptera/train --output-dir O --max-steps 8\n```"
    ) in pretrained
    assert "\n# bit-tiny pre-trained on hymenoptera\n" in pretrained
    assert "| `weight_decay` | 0.0001 |" in pretrained and "final training loss 0.4123" in pretrained
    assert "scores = logits.sigmoid()[0]" in pretrained  # multi-label: the usage code uses the right activation

    converted = (folders["converted"] / "README.md").read_text()
    assert "| source kind | npz |" in converted and "No evaluation results are recorded" in converted
    assert "| source (as given) | small.npz |" in converted and "from the npz source `small.npz`" in converted
    assert "| Parameters | 8,308,810 (backbone 8,288,320 + head 20,490) |" in converted

    saved = (folders["saved"] / "README.md").read_text()
    assert "No evaluation results are recorded in this folder." in saved
    results_section = saved.split("## Results")[1].split("## Usage")[0]
    assert "|" not in results_section and "![" not in results_section


def test_plots_are_valid_pngs_embedded_in_the_card(folders):
    expected = {
        "fine-tuned": ["training_curves.png", "few_shot_accuracy.png"],
        "pretrained": ["training_curves.png", "probe_accuracy.png"],
        "converted": [],
        "saved": [],
    }
    for kind, names in expected.items():
        text = (folders[kind] / "README.md").read_text()
        assert re.findall(r"!\[[^]]*\]\(([^)]+)\)", text) == names, kind
        for name in names:
            with Image.open(folders[kind] / name) as image:
                assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 300
                image.verify()


def test_without_matplotlib_the_card_has_no_plots_and_stale_ones_are_removed(folders, tmp_path):
    folder = shutil.copytree(folders["fine-tuned"], tmp_path / "finetuned")
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # import matplotlib now raises ImportError
        f"from model_cards import write_model_card; write_model_card({str(folder)!r})"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    text = (folder / "README.md").read_text()
    assert "![" not in text and not list(folder.glob("*.png"))
    assert "| 5 | 3 | 62.09% | 55.00% | 70.00% |" in text  # the numbers are all still there
    assert_honest_text(text)


def test_plots_show_what_the_tables_do_not(folders, tmp_path):
    from model_cards.facts import read_folder
    from model_cards.plots import PROBE_FILE, plan_plots

    planned = {plot.file: plot for plot in plan_plots(read_folder(folders["fine-tuned"]))}
    # The learning rate is on a log scale: warmup and each ×0.1 decay are visible steps.
    _, lr_axes = planned["training_curves.png"].figure().axes
    assert lr_axes.get_yscale() == "log" and lr_axes.get_lines()[0].get_ydata().tolist() == [
        0.00017578125,
        1.7578125e-05,
    ]
    # One number of examples per class: every trial is its own point, against the median and the range.
    trials_axes = planned["few_shot_accuracy.png"].figure().axes[0]
    open_points, saved_point = (collection.get_offsets().tolist() for collection in trials_axes.collections[-2:])
    assert open_points == [[1, 0.55], [2, 0.6209], [3, 0.7]] and saved_point == [[2, 0.6209]]

    # The probe: a panel per axis with several values; a single probed number is left to the table.
    folder = shutil.copytree(folders["pretrained"], tmp_path / "pretrained")
    probes = json.loads((folder / "probe_results.json").read_text())
    for _kept, panels in (([8], ["After step 8", "During pre-training"]),):
        assert [
            a.get_title() for a in {p.file: p for p in plan_plots(read_folder(folder))}[PROBE_FILE].figure().axes
        ] == panels
    write_json(folder / "probe_results.json", [e for e in probes if e["step"] == 8])  # one step, two k
    [probe] = [p for p in plan_plots(read_folder(folder)) if p.file == PROBE_FILE]
    assert [a.get_title() for a in probe.figure().axes] == ["After step 8"]
    write_json(folder / "probe_results.json", [e for e in probes if e["step"] == 8 and e["examples_per_class"] == 5])
    assert PROBE_FILE not in [p.file for p in plan_plots(read_folder(folder))]
    text = write_model_card(folder).read_text()
    assert not (folder / PROBE_FILE).exists() and PROBE_FILE not in text and "| 5 | " in text


# --- refusals and honesty ---------------------------------------------------------------------------------------


METADATA_FILES = {
    "fine-tuned": [
        "bit_hyperrule.json",
        "bit_finetune_args.json",
        "eval_results.json",
        "all_results.json",
        "training_log.json",
        "preprocessor_config.json",
    ],
    "pretrained": ["bit_pretraining.json", "training_log.jsonl", "probe_results.json", "preprocessor_config.json"],
    "converted": ["bit_conversion.json", "preprocessor_config.json"],
}


def test_a_folder_missing_any_one_metadata_file_still_renders_an_honest_card(folders, tmp_path):
    for kind, names in METADATA_FILES.items():
        for name in names:
            folder = shutil.copytree(folders[kind], tmp_path / f"{kind}-without-{name}")
            (folder / name).unlink()
            text = write_model_card(folder).read_text()
            assert_honest_text(text)
            prose = re.sub(r"```.*?```", "", text, flags=re.S)
            assert not re.search(r"``|\(\s*\)| ,| \.$|: \.", prose, flags=re.M), (kind, name)
            card_of(folder)  # the metadata parses


MALFORMED = [
    ("probe_results.json", '{"step": 4, "accuracy": 0.5}', "the file should be a JSON list, not a JSON object"),
    ("probe_results.json", "[[4, 1, 0.5]]", "every entry should be a JSON object, not a JSON list"),
    ("probe_results.json", "[{not json", "is not readable JSON"),
    (
        "bit_pretraining.json",
        '{"dataset": "hymenoptera", "command": []}',
        "'dataset' should be a JSON object, not a string",
    ),
    ("training_log.jsonl", '{"step": 1, "loss": 0.5}\n[2, 0.4]\n', "line 2 should be a JSON object"),
    (
        "bit_finetune_args.json",
        '{"command": "bit-finetune --model x"}',
        "'command' should be a JSON list, not a string",
    ),
    ("training_log.json", '{"log_history": [1, 2]}', "every entry of 'log_history' should be a JSON object"),
    ("eval_results.json", "[0.5]", "the file should be a JSON object, not a JSON list"),
    ("config.json", '{"model_type": "bit", "depths": 3}', "'depths' should be a JSON list, not an integer"),
    (
        "bit_hyperrule.json",
        '{"overrides": [{"a": 1}]}',
        "every entry of 'overrides' should be a string, not a JSON object",
    ),
    (
        "eval_results.json",
        '{"eval_accuracy": 60, "eval_accuracy_trials": [50, 60, 70]}',
        "'eval_accuracy' holds 60; accuracies are fractions in [0, 1]",
    ),
    ("probe_results.json", '[{"step": 4, "examples_per_class": 1, "accuracy": 55.0}]', "'accuracy' holds 55.0"),
]


def test_malformed_metadata_is_refused_with_the_file_and_what_was_expected(folders, tmp_path, capsys):
    for index, (name, content, message) in enumerate(MALFORMED):
        kind = "fine-tuned" if name in METADATA_FILES["fine-tuned"] or name == "config.json" else "pretrained"
        folder = shutil.copytree(folders[kind], tmp_path / f"malformed-{index}")
        (folder / name).write_text(content)
        before = folder_bytes(folder)
        with pytest.raises(CardError) as error:
            write_model_card(folder)
        assert str(folder / name) in str(error.value) and message in str(error.value), str(error.value)
        assert folder_bytes(folder) == before
    assert bit_model_card([str(folder)]) == 1  # the command says so, without a traceback
    assert capsys.readouterr().err.startswith(f"bit-model-card: error: {folder / name}: ")


def test_recorded_commands_are_shown_as_the_user_reruns_them():
    from model_cards.card import pretraining_command, shell_command

    arguments = ["--train-dir", "/home/someone/data/birds/train", "--output-dir=/scratch/runs/r1", "--max-steps", "8"]
    rerun = "--train-dir birds/train --output-dir=r1 --max-steps 8"
    for argv, processes, launcher, expected in (
        (
            ["/home/someone/bit-transfer/pretraining/pretrain.py", *arguments],
            1,
            None,
            f"accelerate launch pretraining/pretrain.py {rerun}",
        ),
        # Folders from before the launcher was recorded: accelerate needs --multi_gpu to start N processes.
        (
            ["pretraining/pretrain.py", *arguments],
            4,
            None,
            f"accelerate launch --multi_gpu --num_processes 4 pretraining/pretrain.py {rerun}",
        ),
        (["/usr/local/bin/bit-pretrain", *arguments], None, None, f"bit-pretrain {rerun}"),
        (
            ["/usr/local/bin/bit-pretrain", *arguments],
            2,
            None,
            f"accelerate launch --multi_gpu --num_processes 2 pretraining/pretrain.py {rerun}",
        ),
        # The launcher line the run recorded wins (pretraining.launching.launch_prefix wrote it).
        (
            ["/abs/pretraining/pretrain.py", *arguments],
            2,
            ["torchrun", "--nproc_per_node", "2"],
            f"torchrun --nproc_per_node 2 pretraining/pretrain.py {rerun}",
        ),
        (["pretraining/pretrain.py", *arguments], 1, ["python"], f"python pretraining/pretrain.py {rerun}"),
        (["/usr/lib/python3/site-packages/pytest/__main__.py", "-q"], 1, ["python"], ""),
        ([], 1, None, ""),
    ):
        assert shell_command(pretraining_command(argv, processes, launcher)) == expected, argv
    assert (
        shell_command(["bit-finetune", "--dataset", "C:\\data\\beans", "--model", "google/bit-50", "--name", "a b"])
        == "bit-finetune --dataset beans --model google/bit-50 --name 'a b'"
    )


def assert_no_local_paths(text: str, *paths: Path) -> None:
    """The producer's file system stays out of the card."""
    for path in paths:
        assert str(path) not in text, path
    assert not re.search(r"(?<![\w.:/])/(tmp|home|root|work|opt|Users|var)/", text)


def test_invalid_ids_and_licences_are_refused_before_anything_is_written(folders, tmp_path):
    with pytest.raises(CardError, match="metric 'acc'"):
        checked_eval_result(dataset_type="beans", dataset_name="Beans", metric_type="acc", metric_value=0.5)
    with pytest.raises(CardError, match="dataset '../beans'"):
        checked_eval_result(dataset_type="../beans", dataset_name="Beans", metric_type="accuracy", metric_value=0.5)
    with pytest.raises(CardError, match="expected a fraction"):
        checked_eval_result(dataset_type="beans", dataset_name="Beans", metric_type="accuracy", metric_value=62.1)
    # A folder whose card, plots and widget examples are still to be written: a refusal writes none of them.
    folder = shutil.copytree(folders["fine-tuned"], tmp_path / "finetuned")
    for name in ("README.md", "training_curves.png", "few_shot_accuracy.png"):
        (folder / name).unlink()
    before = folder_bytes(folder)
    for options, message in (
        (CardOptions(repo_id="no-namespace"), "needs a namespace"),
        (CardOptions(repo_id="a/b/c"), "not a Hub repository id"),
        (CardOptions(license="Apache 2.0"), "expected a Hub licence id"),
        (CardOptions(base_model="../model"), "not a Hub repository id"),
    ):
        with pytest.raises(CardError, match=message):
            prepare_hub_folder(folder, options)
        with pytest.raises(CardError, match=message):
            write_card(folder, options)
        assert folder_bytes(folder) == before and not (folder / "examples").exists()


def finetuned_card(folder: Path, hymenoptera: Path, dataset: dict, labels=("ants", "bees")) -> tuple[ModelCard, str]:
    save_tiny(folder, list(labels), 64, seed=1)
    write_finetuned_records(folder, hymenoptera, dataset=dataset)
    text = write_model_card(folder).read_text()
    return card_of(folder), text


def test_dataset_metadata_follows_what_the_producer_recorded_not_the_current_directory(
    tmp_path, hymenoptera_dir, monkeypatch
):
    # The working directory holds folders spelled like the recorded names: they must change nothing.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "beans").mkdir()
    (tmp_path / "someone" / "hymenoptera").mkdir(parents=True)

    # `--dataset beans`, a Hub name: a validated Hub id in `datasets:` and the model-index.
    card, _ = finetuned_card(tmp_path / "hub", hymenoptera_dir, {"name": "beans", "validation_split": "test"})
    assert card.data.datasets == ["beans"]
    assert {(r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {("beans", "test")}

    hub = tmp_path / "hub-namespaced"
    save_tiny(hub, [f"class {i}" for i in range(7)], 64, seed=1)
    write_finetuned_records(hub, hymenoptera_dir, dataset={"name": "someone/hymenoptera", "config": "full"})
    args = json.loads((hub / "bit_finetune_args.json").read_text())
    write_json(hub / "bit_finetune_args.json", {**args, "model": "google/bit-50"})
    write_model_card(hub)
    data = card_of(hub).data
    assert data.datasets == ["someone/hymenoptera"] and data.base_model == "google/bit-50"
    # A relative local folder reads like a Hub id; bit-finetune records that it was a folder.
    write_json(hub / "bit_finetune_args.json", {**args, "model": "runs/base", "model_is_local_folder": True})
    write_model_card(hub)
    assert card_of(hub).data.get("base_model") is None
    write_json(hub / "bit_finetune_args.json", {**args, "model": "google/bit-50"})
    write_model_card(hub)
    # No validation split recorded: bit-finetune evaluated on examples it held out of training.
    assert {(r.dataset_type, r.dataset_config, r.dataset_split) for r in data.eval_results} == {
        ("someone/hymenoptera", "full", "validation")
    }
    assert [(r.metric_name, r.metric_value) for r in data.eval_results][1:] == [("Top-5 accuracy", 1.0)]  # 7 classes
    assert (
        "Evaluation on examples of the Hub dataset `someone/hymenoptera` (configuration `full`) held out of "
        "training" in (hub / "README.md").read_text()
    )

    # `--train-dir digits` (relative, not even present here): a local image folder, never a Hub dataset.
    card, text = finetuned_card(tmp_path / "train-dir", hymenoptera_dir, {"train_dir": "digits"})
    assert card.data.get("datasets") is None
    assert {(r.dataset_type, r.dataset_name, r.dataset_split) for r in card.data.eval_results} == {
        ("imagefolder", "digits (image folder)", "validation")
    }
    assert "the local image folder `digits`" in text

    # `--dataset /abs/path/hymenoptera` (datasets.load_dataset of a local folder): described in prose only.
    card, text = finetuned_card(tmp_path / "local-name", hymenoptera_dir, {"name": str(hymenoptera_dir)})
    assert card.data.get("datasets") is None and card.data.eval_results is None
    assert "the local dataset `hymenoptera`" in text and "62.09%" in text and str(hymenoptera_dir) not in text

    # bit-finetune's main job records scikit-learn's digits: no Hub dataset either.
    card, text = finetuned_card(tmp_path / "main-job", hymenoptera_dir, {"name": "sklearn.datasets.load_digits"})
    assert card.data.get("datasets") is None and card.data.eval_results is None
    assert "scikit-learn's digits" in text


def test_a_card_for_a_hub_repository_lists_the_shipped_widget_examples_and_uses_the_users_licence(folders, tmp_path):
    folder = shutil.copytree(folders["fine-tuned"], tmp_path / "finetuned")
    arguments = ["--repo-id", "someone/bit-ants", "--license", "mit", "--base-model", "someone/bit-m-r50x1"]
    assert bit_model_card([str(folder), *arguments]) == 0
    data = card_of(folder).data
    assert (data.license, data.base_model) == ("mit", "someone/bit-m-r50x1")
    examples = sorted(p.relative_to(folder).as_posix() for p in (folder / "examples").iterdir())
    assert sorted(entry["src"] for entry in data.widget) == [
        f"{constants.ENDPOINT}/someone/bit-ants/resolve/main/{name}" for name in examples
    ]
    assert all(entry["example_title"].startswith("Synthetic test pattern") for entry in data.widget)
    text = (folder / "README.md").read_text()
    assert 'pipeline("image-classification", model="someone/bit-ants")' in text and "not photographs" in text
    first = {name: (folder / name).read_bytes() for name in examples}
    prepare_hub_folder(
        folder, CardOptions(repo_id="someone/bit-ants", license="mit", base_model="someone/bit-m-r50x1")
    )
    assert {name: (folder / name).read_bytes() for name in examples} == first and (
        folder / "README.md"
    ).read_text() == text


# --- stock transformers: the widget's pipeline and the cards' usage code -----------------------------------------


def our_predictions(folder: Path, image: Path) -> list[tuple[str, float]]:
    """Top-5 labels and scores from our classes, scored as the pipeline scores (sigmoid for multi-label)."""
    model = BitForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**processor(load_rgb_image(image), return_tensors="pt")).logits[0]
    scores = logits.sigmoid() if model.config.problem_type == "multi_label_classification" else logits.softmax(-1)
    top = scores.topk(min(5, len(scores)))
    return [(model.config.id2label[i], s) for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def assert_same_predictions(stock: list[tuple[str, float]], ours: list[tuple[str, float]], tolerance: float) -> None:
    assert [label for label, _ in stock] == [label for label, _ in ours]
    assert max(abs(a - b) for (_, a), (_, b) in zip(stock, ours, strict=True)) <= tolerance


def printed_predictions(output: str) -> list[tuple[str, float]]:
    return [(label, float(score)) for label, score in re.findall(r"^(.*): ([0-9.]+)$", output, flags=re.M)]


def test_stock_pipeline_and_the_cards_usage_code_agree_with_our_classes(
    folders, produced, ant_image_path, hymenoptera_dir
):
    folders = {**folders, **produced}  # every kind of folder, and the producers' own
    bee = sorted((hymenoptera_dir / "val" / "bees").glob("*.jpg"))[0]
    images = [str(ant_image_path), str(bee)]
    snippets = {kind: python_blocks((folder / "README.md").read_text()) for kind, folder in folders.items()}
    assert all(len(blocks) == 2 and all('"path/to/image.jpg"' in b for b in blocks) for blocks in snippets.values())
    stock = run_clean_python(f"""
        import contextlib, io, os
        from transformers import pipeline
        folders, images, snippets = {json.dumps({k: str(v) for k, v in folders.items()})}, {images!r}, {snippets!r}
        result = {{}}
        for kind, folder in folders.items():
            classify = pipeline("image-classification", model=folder)
            widget = [[(p["label"], p["score"]) for p in classify(image, top_k=5)] for image in images]
            os.chdir(os.path.dirname(folder))  # the cards name their folder relative to its parent
            printed = []
            for block in snippets[kind]:
                output = io.StringIO()
                with contextlib.redirect_stdout(output):
                    exec(block.replace("path/to/image.jpg", images[0]), {{}})
                printed.append(output.getvalue())
            result[kind] = {{"widget": widget, "printed": printed}}
    """)
    for kind, folder in folders.items():
        ours = [our_predictions(folder, Path(image)) for image in images]
        for stock_top5, our_top5 in zip(stock[kind]["widget"], ours, strict=True):
            assert_same_predictions(stock_top5, our_top5, 1e-4)
        for printed in stock[kind]["printed"]:  # both snippets, printed to 4 decimals
            assert_same_predictions(printed_predictions(printed), ours[0], 1e-4 + 5e-5)


# --- the Hub: a loopback server speaking the part of the API huggingface_hub uses --------------------------------


class FakeHub(http.server.ThreadingHTTPServer):
    """Model repositories in memory (`repos[repo_id][path] = bytes`), plain files for downloads (`files`), and a
    record of every request (method, path, Authorization header) and every commit (repo id, paths)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.files: dict[str, bytes] = {}
        self.repos: dict[str, dict[str, bytes]] = {}
        self.created: list[dict] = []
        self.commits: list[tuple[str, list[str]]] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def revision(self, repo_id: str) -> str:
        files = self.repos[repo_id]
        return hashlib.sha1(b"".join(p.encode() + git_hash(d).encode() for p, d in sorted(files.items()))).hexdigest()

    def api_writes(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path, _ in self.requests if method == "POST"]


class _FakeHubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):
        """Silent: pytest shows the recorded requests when an assertion needs them."""

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value, headers: dict | None = None):
        self._reply(status, json.dumps(value).encode(), headers)

    def _not_found(self, code: str):
        self._json(404, {"error": code}, {"X-Error-Code": code})

    def _record(self) -> str:
        path = self.path.split("?")[0]
        with self.server.lock:
            self.server.requests.append((self.command, path, self.headers.get("Authorization")))
        return path

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path, hub = self._record(), self.server
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/main", path):  # list_repo_files (recursive)
            if match[1] not in hub.repos:
                return self._not_found("RepoNotFound")
            return self._json(
                200,
                [
                    {"type": "file", "path": name, "size": len(data), "oid": git_hash(data)}
                    for name, data in sorted(hub.repos[match[1]].items())
                ],
            )
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/main)?", path):  # model_info
            if match[1] not in hub.repos:
                return self._not_found("RepoNotFound")
            # With ?blobs=true the Hub adds each file's size and git blob id (and, for LFS files, their SHA-256;
            # this fake stores every file as a regular git blob).
            return self._json(
                200,
                {
                    "id": match[1],
                    "sha": hub.revision(match[1]),
                    "siblings": [
                        {"rfilename": name, "size": len(data), "blobId": git_hash(data)}
                        for name, data in sorted(hub.repos[match[1]].items())
                    ],
                },
            )
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):  # by branch or by commit
            repo = hub.repos.get(match[1])
            if repo is None:
                return self._not_found("RepoNotFound")
            if match[2] not in repo:
                return self._not_found("EntryNotFound")
            data = repo[match[2]]
            return self._reply(
                200,
                data,
                {"X-Repo-Commit": hub.revision(match[1]), "ETag": f'"{git_hash(data)}"'},
                content_type="application/octet-stream",
            )
        if path in hub.files:
            return self._reply(200, hub.files[path], content_type="application/octet-stream")
        self._not_found("EntryNotFound")

    def do_POST(self):
        path, hub = self._record(), self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            with hub.lock:
                hub.created.append(payload)
                if repo_id in hub.repos:
                    return self._json(
                        409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                    )
                hub.repos[repo_id] = {".gitattributes": GITATTRIBUTES}  # the Hub's initial commit
            return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":  # what the Hub checks of a README before an upload starts
            try:
                ModelCard(json.loads(body)["content"])
            except ValueError as error:
                return self._json(400, {"errors": [{"message": str(error)}]})
            return self._json(200, {"errors": [], "warnings": []})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/main", path):
            remote = hub.repos.get(match[1])
            if remote is None:
                return self._not_found("RepoNotFound")
            return self._json(
                200,
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": git_hash(remote[f["path"]]) if f["path"] in remote else None,
                        }
                        for f in json.loads(body)["files"]
                    ]
                },
            )
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/main", path):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            added = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            deleted = [line["value"]["path"] for line in lines if line["key"] == "deletedFile"]
            with hub.lock:
                hub.repos[match[1]].update(added)
                for path in deleted:
                    del hub.repos[match[1]][path]
                hub.commits.append((match[1], sorted(added)) + ((sorted(deleted),) if deleted else ()))
            return self._json(
                200,
                {
                    "commitUrl": f"{hub.url}/{match[1]}/commit/{hub.revision(match[1])}",
                    "commitOid": hub.revision(match[1]),
                },
            )
        self._json(500, {"error": f"the fake Hub does not implement POST {path}"})


@pytest.fixture
def hub():
    yield from serving(FakeHub())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in local_files(folder).items()}


GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def repo_of(folder: Path) -> dict[str, bytes]:
    """What a Hub repository holding exactly `folder` holds: its files and the Hub's own `.gitattributes`."""
    return {**folder_bytes(folder), ".gitattributes": GITATTRIBUTES}


class RecordingHfApi(HfApi):
    """The real client, remembering the arguments of the calls a push makes (copied: upload_folder edits lists)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, copy.deepcopy(kwargs)))
        return super().create_repo(*args, **kwargs)

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), copy.deepcopy(kwargs)))
        return super().upload_folder(**kwargs)


def test_push_uploads_the_exact_folder_then_leaves_an_identical_repository_alone(hub, folders, tmp_path, monkeypatch):
    folder = shutil.copytree(folders["pretrained"], tmp_path / "pretrained")
    prepare_hub_folder(folder, CardOptions(repo_id="someone/bit-tiny-upstream"))
    (folder / ".README.md.123.tmp").write_text("a crashed write's leftover")  # hidden: never uploaded
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = RecordingHfApi(endpoint=hub.url, token="hf_write_token")

    first = push_folder(folder, "someone/bit-tiny-upstream", api=api)
    assert api.calls == [
        ("create_repo", ("someone/bit-tiny-upstream",), {"repo_type": "model", "exist_ok": True}),
        (
            "upload_folder",
            (),
            {
                "repo_id": "someone/bit-tiny-upstream",
                "repo_type": "model",
                "folder_path": folder,
                "commit_message": "Upload pretrained with bit-transfer",
                "ignore_patterns": [".*", "*/.*"],
                "delete_patterns": ["*"],
            },
        ),
    ]
    assert first.uploaded and hub.created == [
        {"name": "bit-tiny-upstream", "organization": "someone", "type": "model"}
    ]
    assert hub.repos["someone/bit-tiny-upstream"] == repo_of(folder)
    assert ".README.md.123.tmp" not in hub.repos["someone/bit-tiny-upstream"]
    assert {auth for _, _, auth in hub.requests} == {"Bearer hf_write_token"}

    hub.requests.clear()
    second = push_folder(folder, "someone/bit-tiny-upstream", api=api)
    assert not second.uploaded and hub.api_writes() == []  # one model_info, nothing created or sent
    assert [(method, path) for method, path, _ in hub.requests] == [("GET", "/api/models/someone/bit-tiny-upstream")]

    del hub.repos["someone/bit-tiny-upstream"]["examples/rings.png"]  # an upload interrupted before this file
    hub.repos["someone/bit-tiny-upstream"]["README.md"] = b"an older card"
    third = push_folder(folder, "someone/bit-tiny-upstream", api=api)
    assert sorted(third.changed_files) == ["README.md", "examples/rings.png"]
    assert hub.commits[-1] == ("someone/bit-tiny-upstream", ["README.md", "examples/rings.png"])  # only what differed
    assert hub.repos["someone/bit-tiny-upstream"] == repo_of(folder)

    # Files the folder no longer has (a plot an older card embedded, renamed weights) are deleted in the same
    # commit; the Hub's .gitattributes stays. Then the repository is identical again, and left alone.
    hub.repos["someone/bit-tiny-upstream"].update(
        {"few_shot_accuracy.png": b"old plot", "old/pytorch_model.bin": b"x"}
    )
    fourth = push_folder(folder, "someone/bit-tiny-upstream", api=api)
    assert (fourth.uploaded, fourth.changed_files, fourth.deleted_files) == (
        True,
        [],
        ["few_shot_accuracy.png", "old/pytorch_model.bin"],
    )
    assert hub.commits[-1] == ("someone/bit-tiny-upstream", [], ["few_shot_accuracy.png", "old/pytorch_model.bin"])
    assert hub.repos["someone/bit-tiny-upstream"] == repo_of(folder)
    assert not push_folder(folder, "someone/bit-tiny-upstream", api=api).uploaded


def test_push_without_token_offline_or_unreachable_fails_clearly_and_keeps_the_folder(
    folders, tmp_path, monkeypatch, capsys
):
    folder = folders["fine-tuned"]
    before = folder_bytes(folder)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubPushError, match="No Hugging Face token: log in with `hf auth login` or set HF_TOKEN"):
        push_folder(folder, "someone/model")
    assert bit_model_card([str(folder), "--repo-id", "someone/model", "--push"]) == 1  # refused before rendering
    assert "No Hugging Face token" in capsys.readouterr().err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set"):
        push_folder(folder, "someone/model", api=HfApi(token="hf_token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(
        HubPushError, match=f"Cannot reach the Hub at http://127.0.0.1:{closed}.*run the same command again"
    ):
        push_folder(folder, "someone/model", api=HfApi(endpoint=f"http://127.0.0.1:{closed}", token="hf_token"))
    assert folder_bytes(folder) == before


def test_bit_convert_all_refuses_bad_options_before_any_work(tmp_path, capsys):
    assert bit_convert(["--all", "--output-root", str(tmp_path), "--names", "BiT-Q-R9x9"]) == 1
    assert "Not published BiT names: BiT-Q-R9x9" in capsys.readouterr().err
    # Without a namespace no card can name its repository (widget, usage code, base model): refused, with or
    # without --push, as is a namespace the Hub cannot use.
    for extra in ([], ["--push"]):
        assert bit_convert(["--all", "--output-root", str(tmp_path), *extra]) == 1
        assert "--all needs --namespace NS" in capsys.readouterr().err
    assert bit_convert(["--all", "--output-root", str(tmp_path), "--namespace", "some one"]) == 1
    assert "--namespace 'some one' cannot name Hub repositories" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert bit_convert(["--all", "--output-root", str(a_file / "hub"), "--namespace", "someone"]) == 1
    assert "a-file is a file; expected a folder" in capsys.readouterr().err
    a_file.unlink()
    for argv in (
        ["BiT-M-R50x1", "--all", "--output-root", str(tmp_path)],
        ["--all"],
        ["--push", "x.npz", "--output", "y"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            bit_convert(argv)
        assert exit_info.value.code == 2
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def r50_npz_bytes(tmp_path_factory) -> bytes:
    """A synthetic checkpoint shaped like BiT-S-R50x1 (what its name promises): 25.5 M random parameters."""
    path = tmp_path_factory.mktemp("r50") / "BiT-S-R50x1.npz"
    return write_npz(path, published_arrays(R50_DEPTHS, num_classes=1000, seed=5)).read_bytes()


def test_bit_convert_all_writes_pushes_and_resumes_hub_ready_folders(hub, tmp_path, r50_npz_bytes):
    hub.files["/BiT-S-R50x1.npz"] = r50_npz_bytes
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "BIT_WEIGHTS_URL": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_TOKEN": "hf_write_token",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    command = [
        sys.executable,
        "-m",
        "model_cards.bit_convert",
        "--all",
        "--output-root",
        str(tmp_path / "R"),
        "--names",
        "bit-s-r50x1",
        "--namespace",
        "someone",
        "--push",
    ]

    def run() -> str:
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr
        return completed.stdout

    assert "BiT-S-R50x1 -> " in (output := run()) and "(converted); pushed" in output
    folder, repo_id = tmp_path / "R" / "bit-s-r50x1", "someone/bit-s-r50x1"
    assert sorted(local_files(folder)) == sorted(
        [
            "README.md",
            "bit_conversion.json",
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "examples/checkerboard.png",
            "examples/colour-bars.png",
            "examples/rings.png",
        ]
    )
    assert hub.repos[repo_id] == repo_of(folder)
    assert hub.created == [{"name": "bit-s-r50x1", "organization": "someone", "type": "model"}]

    data = card_of(folder).data
    assert (data.license, data.datasets, data.get("base_model"), data.eval_results) == (
        "apache-2.0",
        ["imagenet-1k"],
        None,
        None,
    )
    assert sorted(w["src"] for w in data.widget) == [
        f"{hub.url}/{repo_id}/resolve/main/examples/{name}"
        for name in ("checkerboard.png", "colour-bars.png", "rings.png")
    ]
    text = (folder / "README.md").read_text()
    assert (
        "The published Big Transfer (BiT) checkpoint **BiT-S-R50x1**, pre-trained by the BiT authors on ILSVRC-2012"
        in text
    )
    assert_honest_text(text)

    # A run interrupted before the weights reached the Hub, run again: the conversion is kept, the folder is
    # re-rendered byte for byte, and only the missing file is committed.
    del hub.repos[repo_id]["model.safetensors"]
    hub.requests.clear()
    assert "(kept the earlier conversion); pushed 1 file(s)" in run()
    assert hub.commits[-1] == (repo_id, ["model.safetensors"]) and hub.repos[repo_id] == repo_of(folder)
    assert not any(path.endswith(".npz") for _, path, _ in hub.requests)
    assert {auth for _, path, auth in hub.requests if path.startswith("/api/")} == {"Bearer hf_write_token"}

    # What a Hub user runs: the card's own usage code, verbatim, against the repository, in stock transformers.
    blocks = python_blocks(text)
    printed = run_clean_python(f"""
        import os
        os.environ.update(HF_ENDPOINT={hub.url!r}, HF_HOME={str(tmp_path / "user")!r}, HF_HUB_OFFLINE="0")
        import contextlib, io
        result = []
        for block in {blocks!r}:  # the pipeline, as the widget runs it, then the Auto classes
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                exec(block, {{}})
            result.append(output.getvalue())
    """)
    example = our_predictions(folder, folder / "examples" / "colour-bars.png")
    for output in printed:
        assert_same_predictions(printed_predictions(output), example, 1e-4 + 5e-5)


# --- folders written by the producers' own small runs ----------------------------------------------------------


@pytest.fixture(scope="module")
def produced(tmp_path_factory, hymenoptera_dir) -> dict[str, Path]:
    """A few-shot `bit-finetune` run (3 trials) and a `pretraining/pretrain.py` run on the real photographs, each
    ending, as every producer does, with `write_model_card`."""
    from finetune import cli as finetune_cli
    from pretraining import pretrain

    root = tmp_path_factory.mktemp("produced")
    photos = root / "photos"  # a small sample of the real photographs (in the test's temporary folder only)
    for split, source, per_class in (("train", "train", 12), ("validation", "val", 8)):
        for name in ("ants", "bees"):
            (photos / split / name).mkdir(parents=True)
            for path in sorted((hymenoptera_dir / source / name).glob("*.jpg"))[:per_class]:
                shutil.copy(path, photos / split / name / path.name)
    base = save_tiny(root / "base", [f"class {i}" for i in range(10)], 32, seed=6)
    finetuned = root / "bit-finetune"
    assert (
        finetune_cli.main(
            [
                "--model",
                str(base),
                "--train-dir",
                str(photos / "train"),
                "--validation-dir",
                str(photos / "validation"),
                "--output-dir",
                str(finetuned),
                "--examples-per-class",
                "5",
                "--trials",
                "3",
                "--num-workers",
                "0",
                "--max-steps",
                "4",
                "--batch-size",
                "8",
                "--micro-batch-size",
                "4",
                "--resolution",
                "40",
                "32",
            ]
        )
        == 0
    )
    pretrained = pretrain.train(
        [
            "--model-preset",
            "bit-tiny",
            "--image-size",
            "32",
            "--warmup-steps",
            "1",
            "--train-dir",
            str(photos),
            "--max-steps",
            "4",
            "--global-batch-size",
            "8",
            "--per-device-batch-size",
            "8",
            "--logging-steps",
            "1",
            "--probe-every",
            "2",
            "--dataloader-num-workers",
            "0",
            "--output-dir",
            str(root / "pretraining"),
        ]
    ).final
    return {"bit-finetune": finetuned, "pretrain.py": pretrained}


def test_cards_of_the_producers_own_runs(produced, hymenoptera_dir):
    finetuned = card_of(produced["bit-finetune"]).data
    assert (
        json.loads((produced["bit-finetune"] / "bit_finetune_args.json").read_text())["model_is_local_folder"] is True
    )
    assert finetuned.get("base_model") is None  # started from a local folder
    recorded = json.loads((produced["bit-finetune"] / "eval_results.json").read_text())
    assert len(recorded["eval_accuracy_trials"]) == 3 and "few-shot" in finetuned.tags
    assert [(r.metric_name, r.metric_value, r.dataset_type, r.dataset_split) for r in finetuned.eval_results] == [
        (
            "Accuracy (median of 3 fine-tuning trials, 5 examples per class)",
            recorded["eval_accuracy"],
            "imagefolder",
            "validation",
        )
    ]
    text = (produced["bit-finetune"] / "README.md").read_text()
    assert (
        "bit-finetune --model base --train-dir photos/train --validation-dir photos/validation --output-dir "
        "bit-finetune --examples-per-class 5"
    ) in text and "BiT-HyperRule record (`bit_hyperrule.json`)" in text
    low, high = (f"{100 * recorded[key]:.2f}%" for key in ("eval_accuracy_min", "eval_accuracy_max"))
    assert f"| 5 | 3 | {100 * recorded['eval_accuracy']:.2f}% | {low} | {high} |" in text
    saved = json.loads((produced["bit-finetune"] / "all_results.json").read_text())["saved_trial"]  # from 1
    saved_accuracy = recorded["eval_accuracy_trials"][saved - 1]
    assert f"| {saved} | {100 * saved_accuracy:.2f}% | yes |" in text

    pretrained = card_of(produced["pretrain.py"]).data
    probes = json.loads((produced["pretrain.py"] / "probe_results.json").read_text())
    last = max(entry["step"] for entry in probes)
    assert [(r.metric_value, r.dataset_type, r.dataset_split) for r in pretrained.eval_results] == [
        (e["accuracy"], "imagefolder", "validation") for e in probes if e["step"] == last
    ]
    text = (produced["pretrain.py"] / "README.md").read_text()
    assert produced["pretrain.py"].name == "final" and "\n# bit-tiny pre-trained on photos\n" in text
    # pretrain.train(argv) records the job's own arguments (not pytest's), rerunnable as the card shows them, with
    # the launcher line the run recorded (one plain process here).
    assert (
        "python pretraining/pretrain.py --model-preset bit-tiny --image-size 32 --warmup-steps 1 "
        "--train-dir photos"
    ) in text and "__main__.py" not in text
    assert pretrained.model_name == "bit-tiny pre-trained on photos"

    for folder, plots in (
        (produced["bit-finetune"], ["training_curves.png", "few_shot_accuracy.png"]),
        (produced["pretrain.py"], ["training_curves.png", "probe_accuracy.png"]),
    ):
        text = (folder / "README.md").read_text()
        assert_honest_text(text)
        assert_no_local_paths(text, folder.parent, hymenoptera_dir)
        assert re.findall(r"!\[[^]]*\]\(([^)]+)\)", text) == plots
        for name in plots:
            with Image.open(folder / name) as image:
                image.verify()


# --- golden cards: the same folders render the same cards, byte for byte -----------------------------------------

GOLDEN_DIR = Path(__file__).parent / "golden" / "model_cards"
# The records `bit-convert` writes for a published checkpoint, on a copy of the small converted folder: each
# published branch of the card (upstream, fine-tuned, distilled student, teacher) without converting real sizes.
PUBLISHED_RECORDS = {
    "BiT-M-R50x1": ("BiT-M-R50x1.npz", "imagenet-21k", None),
    "BiT-M-R50x1-ILSVRC2012": ("BiT-M-R50x1-ILSVRC2012.npz", "imagenet-21k", "ilsvrc-2012"),
    "BiT-R50x1-distilled-224": ("distill/R50x1_224.npz", "ilsvrc-2012", None),
    "BiT-M-R152x2-teacher-384": ("distill/R152x2_T_384.npz", "imagenet-21k", "ilsvrc-2012"),
}


@pytest.fixture(scope="module")
def golden_cases(folders, tmp_path_factory, hymenoptera_dir) -> dict[str, Path]:
    """Every card the fixtures of this file render, each written as its producer (or `bit-model-card`) writes it."""
    root = tmp_path_factory.mktemp("golden")
    cases = {kind: folders[kind] for kind in KINDS}
    for kind in KINDS:
        folder = shutil.copytree(folders[kind], root / f"hub-{kind}")
        prepare_hub_folder(
            folder, CardOptions(repo_id=f"someone/bit-{kind}", license="mit", base_model="someone/bit-base")
        )
        cases[f"hub-{kind}"] = folder
    for kind, names in METADATA_FILES.items():
        for name in names:
            folder = shutil.copytree(folders[kind], root / f"{kind}-without-{name}")
            (folder / name).unlink()
            write_model_card(folder)
            cases[folder.name] = folder
    for case, dataset, labels in (
        ("dataset-hub-name", {"name": "beans", "validation_split": "test"}, ("ants", "bees")),
        ("dataset-hub-id", {"name": "someone/hymenoptera", "config": "full"}, [f"class {i}" for i in range(7)]),
        ("dataset-train-dir", {"train_dir": "digits"}, ("ants", "bees")),
        ("dataset-local-path", {"name": str(hymenoptera_dir)}, ("ants", "bees")),
        ("dataset-main-job", {"name": "sklearn.datasets.load_digits"}, ("ants", "bees")),
    ):
        finetuned_card(root / case, hymenoptera_dir, dataset, labels)
        cases[case] = root / case
    record = json.loads((folders["converted"] / "bit_conversion.json").read_text())
    for name, (file, upstream, fine_tuned) in PUBLISHED_RECORDS.items():
        folder = shutil.copytree(folders["converted"], root / name.lower())
        url = f"https://storage.googleapis.com/bit_models/{file}"
        fields = {"source": name, "source_kind": "published", "published_name": name, "source_url": url}
        write_json(
            folder / "bit_conversion.json",
            {**record, **fields, "upstream_dataset": upstream, "fine_tuned_on": fine_tuned},
        )
        write_model_card(folder)
        cases[f"published-{folder.name}"] = folder
    folder = shutil.copytree(root / "bit-m-r50x1-ilsvrc2012", root / "hub-published")
    prepare_hub_folder(folder, CardOptions(repo_id="someone/bit-m-r50x1-ilsvrc2012", base_model="someone/bit-m-r50x1"))
    cases["hub-published"] = folder
    npz = write_npz(root / "small.npz", published_arrays(SMALL_DEPTHS, num_classes=10, seed=3))
    cases["converted-new-head"] = convert_with_card(npz, root / "converted-new-head", labels=["cat", "dog", "emu"])
    return cases


GOLDEN_CASES = [
    *KINDS,
    *(f"hub-{kind}" for kind in KINDS),
    *(f"{kind}-without-{name}" for kind, names in METADATA_FILES.items() for name in names),
    *("dataset-hub-name", "dataset-hub-id", "dataset-train-dir", "dataset-local-path", "dataset-main-job"),
    *(f"published-{name.lower()}" for name in PUBLISHED_RECORDS),
    "hub-published",
    "converted-new-head",
]


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_cards_render_byte_for_byte_as_their_golden_files(golden_cases, case):
    """`BIT_REGENERATE_GOLDEN_CARDS=1 pytest tests/test_model_cards.py -k golden` rewrites the golden files: do that
    only for an intended change of the cards, and list what changed in the commit."""
    text = (golden_cases[case] / "README.md").read_text(encoding="utf-8")
    golden = GOLDEN_DIR / f"{case}.txt"  # not .md: ruff format would rewrite its Python blocks
    if os.environ.get("BIT_REGENERATE_GOLDEN_CARDS") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")
