"""Upstream pre-training: the recipe's numbers, data sharding, distributed equivalence, exact resume.

The multi-process tests launch the real script under torchrun (gloo on CPU) and plain python, on the
bit-tiny preset and data the tests write; the kill test SIGKILLs a real training process.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, run_clean_python
from PIL import Image
from safetensors.torch import load_file

import image_data
from image_data import InputError
from pretraining import data as upstream_data
from pretraining import embedded_checkpoint_path
from pretraining.arguments import make_recipe, parse_arguments, validate_arguments
from pretraining.checkpoints import RESUME_KEYS, check_resumable, completed_checkpoints, read_progress
from pretraining.probe import few_shot_accuracy, few_shot_probe, fit_ridge_classifier
from pretraining.recipe import (
    Recipe,
    build_schedule,
    gradient_accumulation_steps,
    recipe_for_schedule,
    schedule_for_run,
)
from pretraining.reporting import append_training_log, read_training_log, truncate_training_log
from pretraining.training import upstream_loss

SCRIPT = REPO_ROOT / "pretraining" / "pretrain.py"
TINY_RUN = [
    "--model-preset",
    "bit-tiny",
    "--image-size",
    "32",
    "--warmup-steps",
    "0",
    "--base-learning-rate",
    "1.0",
    "--logging-steps",
    "1",
    "--validation-examples",
    "0",
    "--dataloader-num-workers",
    "0",
]


# --- data the tests write ------------------------------------------------------------------------------


def _png(seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_identity_shards(folder: Path, num_examples: int = 32, num_shards: int = 4) -> Path:
    """Parquet shards where example i has label i: a batch's labels say exactly which examples it holds."""
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(num_examples)])}
    )
    folder.mkdir(parents=True, exist_ok=True)
    for shard, indices in enumerate(np.array_split(np.arange(num_examples), num_shards)):
        rows = {"image": [{"bytes": _png(int(i)), "path": None} for i in indices], "label": [int(i) for i in indices]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"train-{shard:05d}.parquet"))
    return folder


@pytest.fixture(scope="module")
def identity_shards(tmp_path_factory) -> Path:
    return write_identity_shards(tmp_path_factory.mktemp("identity"))


def subprocess_env(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets-cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }


def reset_accelerate() -> None:
    """Forget accelerate's per-process singletons, as a new process would (one run per process otherwise)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state(tmp_path, monkeypatch):
    """In-process runs each start from a clean accelerate state and their own datasets cache."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))
    reset_accelerate()
    yield
    reset_accelerate()


# --- the recipe ------------------------------------------------------------------------------------------


def test_learning_rate_at_warmup_end_and_every_decay_boundary():
    # ImageNet-21k (14,197,122 images) at the paper's batch: 3466.09 steps per epoch.
    num_examples, batch = 14_197_122, 4096
    recipe = recipe_for_schedule("bit-m", global_batch_size=batch)
    schedule = build_schedule(recipe, num_examples, max_steps=None)
    peak = 0.03 * 4096 / 256
    assert math.isclose(schedule.peak_learning_rate, 0.48)
    assert schedule.total_steps == round(90 * num_examples / batch) == 311_948
    boundaries = [round(epoch * num_examples / batch) for epoch in (30, 60, 80)]
    assert list(schedule.decay_steps) == boundaries == [103_983, 207_966, 277_288]
    assert math.isclose(schedule.learning_rate(0), peak / 5000)
    assert schedule.learning_rate(4998) < peak
    assert math.isclose(schedule.learning_rate(4999), peak)  # update 5000 runs at the peak
    assert math.isclose(schedule.learning_rate(5000), peak)
    for index, boundary in enumerate(boundaries):
        assert math.isclose(schedule.learning_rate(boundary - 1), peak * 0.1**index)
        assert math.isclose(schedule.learning_rate(boundary), peak * 0.1 ** (index + 1))

    bit_l = build_schedule(recipe_for_schedule("bit-l", global_batch_size=1024), 1_000_000, max_steps=None)
    steps_per_epoch = 1_000_000 / 1024
    assert bit_l.total_steps == round(40 * steps_per_epoch)
    assert list(bit_l.decay_steps) == [round(e * steps_per_epoch) for e in (10, 23, 30, 37)]
    assert math.isclose(bit_l.learning_rate(bit_l.decay_steps[-1]), 0.03 * 4 * 1e-4)


def test_short_runs_keep_the_schedule_shape_and_report_what_differs():
    recipe = recipe_for_schedule("bit-m", global_batch_size=64, warmup_steps=10)
    short = build_schedule(recipe, None, max_steps=900)
    assert short.decay_steps == (300, 600, 800)  # 30/60/80 of 90 epochs -> the same fractions of 900 steps
    nine_epochs = recipe_for_schedule("bit-m", epochs=9)
    assert nine_epochs.decay_epochs == (3.0, 6.0, 8.0)
    differences = recipe.differences_from_paper()
    assert differences == ["global_batch_size: 64 (paper: 4096)", "warmup_steps: 10 (paper: 5000)"]
    assert Recipe().differences_from_paper() == []
    with pytest.raises(ValueError, match="--max-steps"):
        build_schedule(recipe, None, max_steps=None)


def test_a_short_run_scales_the_warmup_as_it_scales_the_decays_unless_it_is_given():
    batch_64 = recipe_for_schedule("bit-m", global_batch_size=64)
    short = schedule_for_run(batch_64, None, 400, warmup_given=False, length_given=True)
    assert short.schedule.warmup_steps == short.recipe.warmup_steps == round(5000 * 400 / 311_948) == 6
    peak = short.schedule.peak_learning_rate
    assert math.isclose(short.schedule.learning_rate(5), peak)  # the peak is reached (it used to be 8 % of it)
    assert math.isclose(short.schedule.learning_rate(399), peak * 0.1**3)
    assert (
        "the paper's 5000 scaled with the run" in short.warmup_note
        and "1.6% of its 311,948 steps" in short.warmup_note
    )
    assert short.warmup_record() == {
        "steps": 6,
        "paper_steps": 5000,
        "scaled_with_the_run": True,
        "why": short.warmup_note,
    }
    # The paper's own run keeps 5,000; nine epochs of it warm up for a tenth of that.
    paper = schedule_for_run(recipe_for_schedule("bit-m"), 14_197_122, None, warmup_given=False, length_given=False)
    assert paper.schedule.warmup_steps == 5000 and paper.warmup_note is None and paper.schedule.total_steps == 311_948
    nine = schedule_for_run(
        recipe_for_schedule("bit-m", epochs=9), 14_197_122, None, warmup_given=False, length_given=True
    )
    assert nine.schedule.warmup_steps == 500
    # --warmup-steps is kept as given (the embedded checkpoint's command passes 100), unless it fills the run.
    given = schedule_for_run(
        recipe_for_schedule("bit-m", warmup_steps=100), None, 3000, warmup_given=True, length_given=True
    )
    assert given.schedule.warmup_steps == 100 and given.warmup_note is None
    with pytest.raises(InputError, match=r"--warmup-steps 400 is at least the run's 400 steps: .* is 6 here\)"):
        schedule_for_run(
            recipe_for_schedule("bit-m", warmup_steps=400), None, 400, warmup_given=True, length_given=True
        )
    with pytest.raises(
        InputError, match=r"The paper's 5000-step warmup is at least this run's 220 steps \(90 epochs of "
    ):
        schedule_for_run(recipe_for_schedule("bit-m"), 10_000, None, warmup_given=False, length_given=False)


def test_gradient_accumulation_is_derived_or_refused():
    assert gradient_accumulation_steps(4096, 8, 512) == 1  # the paper: 8 images per chip on 512 chips
    assert gradient_accumulation_steps(4096, 32, 8) == 16
    with pytest.raises(ValueError, match=r"not a multiple of per-device batch 24 x 8 process\(es\) = 192"):
        gradient_accumulation_steps(4096, 24, 8)


def test_every_recipe_value_has_a_flag():
    values = {
        "global_batch_size": 512,
        "base_learning_rate": 0.1,
        "base_learning_rate_batch_size": 512,
        "warmup_steps": 7,
        "momentum": 0.8,
        "weight_decay": 5e-5,
        "learning_rate_decay_factor": 0.2,
        "schedule": "bit-l",
        "epochs": 12.0,
        "decay_epochs": (2.0, 5.0),
        "image_size": 64,
        "crop_area_range": (0.2, 0.9),
        "crop_aspect_ratio_range": (0.5, 2.0),
        "horizontal_flip_probability": 0.25,
        "multi_label_head_bias": -4.0,
    }
    assert set(values) == {field.name for field in dataclasses.fields(Recipe)}  # a new recipe value needs a flag
    argv = ["--model-preset", "bit-tiny", "--output-dir", "o", "--train-dir", "d"]
    for name, value in values.items():
        argv += [f"--{name.replace('_', '-')}", *(str(v) for v in (value if isinstance(value, tuple) else [value]))]
    assert dataclasses.asdict(make_recipe(parse_arguments(argv))) == values
    with pytest.raises(InputError, match="--horizontal-flip-probability 1.5"):
        validate_arguments(parse_arguments([*argv, "--horizontal-flip-probability", "1.5"]))


def test_upstream_losses_against_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    weights = torch.tensor([1.0, 1.0, 0.0])  # the third stands in for an unreadable image
    softmax = [-math.log(math.exp(row[y]) / sum(math.exp(v) for v in row)) for row, y in zip(logits.tolist(), labels)]
    assert math.isclose(
        upstream_loss(logits, labels, weights, multi_label=False).item(), (softmax[0] + softmax[1]) / 2, rel_tol=1e-6
    )
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])

    def sigmoid_loss(row, targets):  # per-class binary cross-entropy, summed over classes
        return sum(
            -math.log(1 / (1 + math.exp(-x))) if t else -math.log(1 - 1 / (1 + math.exp(-x)))
            for x, t in zip(row, targets)
        )

    expected = (sigmoid_loss(logits[0].tolist(), multi_hot[0]) + sigmoid_loss(logits[1].tolist(), multi_hot[1])) / 2
    assert math.isclose(upstream_loss(logits, multi_hot, weights, multi_label=True).item(), expected, rel_tol=1e-6)


# --- augmentation and the probe -------------------------------------------------------------------------


def test_inception_crop_boxes_stay_within_area_and_aspect_ranges():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        left, top, right, bottom = upstream_data.inception_crop_box(rng, 160, 160, (0.08, 1.0), (3 / 4, 4 / 3), 10)
        assert 0 <= left < right <= 160 and 0 <= top < bottom <= 160
        areas.append((right - left) * (bottom - top) / (160 * 160))
        ratios.append((right - left) / (bottom - top))
    assert 0.07 < min(areas) < 0.12 and max(areas) > 0.9
    assert min(ratios) > 0.7 and max(ratios) < 1.4
    # A 100:1 strip can never fit a 3/4..4/3 box of random area: the fallback is the centred, widest legal box.
    assert upstream_data.inception_crop_box(rng, 1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), 10) == (493, 0, 506, 10)


def test_ridge_probe_matches_scikit_learn_ridge():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 16))
    labels = np.arange(60) % 4
    queries = rng.normal(size=(25, 16))
    normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    for n in (60, 8):  # primal (n >= d) and dual (n < d) solves
        reference = Ridge(alpha=0.5, fit_intercept=True).fit(normalise(features[:n]), 2 * np.eye(4)[labels[:n]] - 1)
        expected = reference.predict(normalise(queries)).argmax(axis=1)
        predicted = fit_ridge_classifier(features[:n], labels[:n], 4, ridge=0.5)(queries)
        np.testing.assert_array_equal(predicted, expected)


def test_few_shot_accuracy_separates_informative_from_random_features():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 12)
    informative = np.eye(5)[labels] * 3 + rng.normal(scale=0.3, size=(60, 5))
    result = few_shot_accuracy(informative, labels, examples_per_class=1)
    assert result == {**result, "examples_per_class": 1, "num_classes": 5, "num_test_examples": 55, "trials": 5}
    assert result["accuracy"] > 0.95
    assert few_shot_accuracy(rng.normal(size=(60, 5)), labels, 5)["accuracy"] < 0.6
    assert few_shot_accuracy(informative, labels, examples_per_class=12) is None  # no class has a test example


def test_all_shots_of_the_probe_use_the_same_classes_and_a_figure_needs_enough_test_images():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), [20, 20, 6, 6])  # only two classes have more than 10 examples
    features = np.eye(4)[labels] + rng.normal(scale=0.5, size=(52, 4))
    results = few_shot_probe(features, labels, (1, 5, 10))
    assert [r["examples_per_class"] for r in results] == [1, 5, 10]
    assert [(r["num_classes"], r["num_test_examples"]) for r in results] == [(2, 38), (2, 30), (2, 20)]
    assert [r["num_classes"] for r in few_shot_probe(features, labels, (1, 5))] == [4, 4]
    assert few_shot_probe(features, labels, (1, 20)) == [few_shot_accuracy(features, labels, 1)]  # 20 cannot be tested
    # 10-shot over two classes of 12 would be tested on 4 images: not a result. The probe falls back to the
    # shots that have enough test images (5-shot: 7 + 7 + 1 + 1 = 16 over all four classes).
    small = np.repeat(np.arange(4), [12, 12, 6, 6])
    results = few_shot_probe(features[: len(small)], small, (1, 5, 10))
    assert [(r["examples_per_class"], r["num_classes"], r["num_test_examples"]) for r in results] == [
        (1, 4, 32),
        (5, 4, 16),
    ]
    assert few_shot_probe(features[:8], np.repeat([0, 1], 4), (1, 5, 10)) == []  # 6 test images at best


# --- sharding: the data position is a function of the step ----------------------------------------------


def test_step_sampler_shards_are_disjoint_and_equal_one_process_with_the_whole_batch():
    one = upstream_data.StepBatchSampler(8, 1, 0, 1, start_step=0, total_steps=3)
    two = [upstream_data.StepBatchSampler(4, 2, rank, 1, start_step=0, total_steps=3) for rank in (0, 1)]
    accumulated = upstream_data.StepBatchSampler(4, 1, 0, 2, start_step=0, total_steps=3)
    for step, whole in enumerate(one):
        halves = [list(sampler)[step] for sampler in two]
        assert not set(halves[0]) & set(halves[1])
        assert set(halves[0]) | set(halves[1]) == set(whole) == set(range(step * 8, step * 8 + 8))
        assert set(sum(list(accumulated)[2 * step : 2 * step + 2], [])) == set(whole)
    resumed = upstream_data.StepBatchSampler(4, 2, 1, 1, start_step=2, total_steps=3)
    assert list(resumed) == [list(two[1])[2]]
    stream = upstream_data.EpochStream(list(range(10)), seed=3)
    epoch_one = [stream.index_of(p) for p in range(10, 20)]
    assert sorted(epoch_one) == list(range(10)) and epoch_one != [stream.index_of(p) for p in range(10)]


def test_worker_batch_counts_follow_the_dataloader_round_robin():
    assert [upstream_data.worker_batch_count(5, w, 2) for w in (0, 1)] == [3, 2]
    assert [upstream_data.worker_batch_count(1, w, 3) for w in (0, 1, 2)] == [1, 0, 0]
    assert upstream_data.worker_batch_count(0, 0, 1) == 0


def test_a_streams_held_out_slice_never_reaches_any_process(identity_shards):
    source = upstream_data.load_upstream_data(dataset=str(identity_shards), streaming=True, validation_examples=5)
    held_out = {example["label"] for example in source.validation}
    trained = [[example["label"] for example in image_data.shard_stream(source.train, 0, rank, 2)] for rank in (0, 1)]
    assert held_out == {0, 1, 2, 3, 4}  # the first examples of the stream
    assert not held_out & (set(trained[0]) | set(trained[1]))
    assert sorted(trained[0] + trained[1]) == list(range(5, 32))  # everything else, once


def test_streaming_resume_rereads_at_most_one_window_not_the_stream(identity_shards, monkeypatch):
    # datasets sleeps 5 s whenever a multi-shard stream stops (an Arrow thread-shutdown workaround); this test
    # stops one four times.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)
    source = upstream_data.load_upstream_data(dataset=str(identity_shards), streaming=True, validation_examples=0)
    reads = []

    def counted(example):
        reads.append(example["label"])
        return example

    stream = image_data.shard_stream(source.train, 0, 0, 1).map(counted)
    batch, window = 2, 4
    full = list(upstream_data.ResumableStream(stream, batch, 0, 32, 0, seed=0, window_size=window))
    assert sorted(example["label"] for example, _, _ in full[:32]) == list(range(32))  # an epoch, shuffled
    assert [example["label"] for example, _, _ in full[:32]] != list(range(32))
    for done in (10, 19):  # micro-batches trained on before the checkpoint (19: into the second epoch)
        position = json.loads(json.dumps(full[done * batch - 1][2]))  # as progress.json stores it
        reads.clear()
        resumed = list(
            upstream_data.ResumableStream(
                stream, batch, done, 32, 0, seed=0, window_size=window, resume_positions={0: position}
            )
        )
        assert [(e["label"], key) for e, key, _ in resumed] == [
            (e["label"], key) for e, key, _ in full[done * batch :]
        ]
        assert len(reads) - len(resumed) <= window  # re-read: the trained part of one window, not the past stream


# --- two processes under torchrun -------------------------------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from safetensors.torch import save_file
    from pretraining import pretrain

    out = Path(sys.argv[1])
    seen = {}
    result = pretrain.train(sys.argv[2:], on_batch=lambda step, batch: seen.setdefault(step, []).extend(batch["labels"].tolist()))
    accelerator = result.accelerator
    weights = {k: v.detach().contiguous() for k, v in accelerator.unwrap_model(result.model).state_dict().items()}
    save_file(weights, str(out / f"rank{accelerator.process_index}.safetensors"))
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps({"world_size": accelerator.num_processes, "seen": seen}))
    accelerator.end_training()
    """
)


def run_driver(tmp_path: Path, name: str, launcher: list[str], arguments: list[str]) -> Path:
    out = tmp_path / name
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    command = [*launcher, str(driver), str(out), "--output-dir", str(out / "run"), *arguments]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=subprocess_env(tmp_path))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return out


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def identity_shards_with_held_out(tmp_path_factory, identity_shards) -> Path:
    """The identity shards plus a validation split of 12 images for each of classes 0-3 (a probe's worth)."""
    folder = tmp_path_factory.mktemp("held-out") / "data"
    shutil.copytree(identity_shards, folder)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(32)])}
    )
    labels = [index % 4 for index in range(48)]
    rows = {"image": [{"bytes": _png(1000 + index), "path": None} for index in range(48)], "label": labels}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "validation-00000.parquet"))
    return folder


def test_two_processes_split_the_batch_and_match_one_process_with_the_whole_batch(
    tmp_path, identity_shards_with_held_out
):
    data = identity_shards_with_held_out
    common = [*TINY_RUN, "--dataset", str(data), "--max-steps", "2", "--global-batch-size", "8"]
    two = run_driver(tmp_path, "two", TORCHRUN, [*common, "--per-device-batch-size", "4"])
    one = run_driver(tmp_path, "one", [sys.executable], [*common, "--per-device-batch-size", "8"])
    accumulated = run_driver(tmp_path, "accumulated", [sys.executable], [*common, "--per-device-batch-size", "4"])

    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    reference = json.loads((one / "rank0.json").read_text())["seen"]
    for step in ("0", "1"):
        first, second = ranks[0]["seen"][step], ranks[1]["seen"][step]
        assert len(first) == len(second) == 4 and not set(first) & set(second)  # disjoint examples per process
        assert sorted(first + second) == sorted(reference[step])  # global batch = the sum, the same examples
    metadata = json.loads((two / "run" / "final" / "bit_pretraining.json").read_text())
    assert metadata["global_batch_size"] == 8 and metadata["num_processes"] == 2

    rank0, rank1 = load_file(two / "rank0.safetensors"), load_file(two / "rank1.safetensors")
    single, with_accumulation = load_file(one / "rank0.safetensors"), load_file(accumulated / "rank0.safetensors")
    initial = load_file(initial_weights(tmp_path))
    moved = 0
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name  # DDP keeps the replicas identical
        # GN and WS have no batch statistics: 2 x 4 is the same update as 1 x 8 and as 4 x 2 accumulated.
        torch.testing.assert_close(tensor, single[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(with_accumulation[name], single[name], rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(tensor, initial[name]))
    assert moved > len(rank0) // 2  # the updates were real

    # The probe is a function of the weights and the seed: the two processes' probe of their final weights is the
    # probe one process computes of the same weights (it used to differ, by the order the processes gathered rows).
    probed = json.loads((two / "run" / "final" / "probe_results.json").read_text())
    assert [(entry["examples_per_class"], entry["num_test_examples"]) for entry in probed] == [(1, 44), (5, 28)]
    from accelerate import Accelerator

    from modeling_bit import BitForImageClassification
    from pretraining.heldout import HeldOutSet
    from pretraining.probe import few_shot_probe

    source = upstream_data.load_upstream_data(dataset=str(data))
    builder = upstream_data.BatchBuilder("image", "label", source.labels, 32, 0, train=False)
    held_out = HeldOutSet(source, builder, Accelerator(cpu=True), 20, 100, batch_size=4, scan_limit=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs above (OMP_NUM_THREADS=1)
    try:
        result = held_out.evaluate(BitForImageClassification.from_pretrained(two / "run" / "final"), False)
    finally:
        torch.set_num_threads(threads)
    assert [{"step": 2, **entry} for entry in few_shot_probe(result["features"], result["labels"])] == probed


def initial_weights(tmp_path: Path) -> Path:
    """The weights every run above starts from: bit-tiny with 32 classes built after set_seed(0)."""
    from accelerate.utils import set_seed
    from safetensors.torch import save_file

    from modeling_bit import BitConfig, BitForImageClassification

    set_seed(0)
    model = BitForImageClassification(BitConfig.from_preset("bit-tiny", num_labels=32))
    path = tmp_path / "initial.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_two_processes_stream_disjoint_shards(tmp_path, identity_shards):
    out = run_driver(
        tmp_path,
        "stream",
        TORCHRUN,
        [
            *TINY_RUN,
            "--dataset",
            str(identity_shards),
            "--streaming",
            "--max-steps",
            "3",
            "--global-batch-size",
            "8",
            "--per-device-batch-size",
            "4",
            "--num-labels",
            "32",
        ],
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text())["seen"] for r in (0, 1)]
    first = [label for step in ranks[0].values() for label in step]
    second = [label for step in ranks[1].values() for label in step]
    assert len(first) == len(second) == 12
    assert len(set(first + second)) == 24  # split_dataset_by_node: each process streams its own shards


def test_ctrl_c_under_accelerate_launch_stops_both_processes_with_one_message_and_a_checkpoint(
    tmp_path, identity_shards
):
    # `accelerate launch --num_processes 2` alone would run one process on this CPU machine; --multi_gpu runs two.
    output = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    arguments = [*TINY_RUN, "--dataset", str(identity_shards), "--max-steps", "1000", "--global-batch-size", "8"]
    arguments += ["--per-device-batch-size", "4", "--dataloader-num-workers", "1", "--output-dir", str(output)]
    process = subprocess.Popen(
        [*launcher, str(SCRIPT), *arguments],
        env=subprocess_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        log = output / "training_log.jsonl"
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends the launcher; it passes SIGINT on to the processes
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0
    assert "4 per device x 2 process(es)" in stdout  # two processes really ran
    stops = re.findall(
        r"^pretrain: stopped by SIGINT after step (\d+) of 1000; saved (\S+)\. Continue with:\n  (.*)$", stderr, re.M
    )
    assert len(stops) == 1, stderr[-4000:]  # one message, from the main process
    step, checkpoint, command = stops[0]
    assert command.startswith("accelerate launch --multi_gpu --num_processes 2 ") and command.endswith(
        f"--output-dir {output} --resume-from-checkpoint latest"
    )
    assert (
        read_progress(Path(checkpoint))["step"] == int(step) and read_progress(Path(checkpoint))["num_processes"] == 2
    )
    # Neither process printed a traceback; the launcher reports the signal it got itself, in one traceback at most.
    assert not re.search(r"KeyboardInterrupt|Connection closed|ChildFailedError", stderr), stderr[-4000:]
    tracebacks = stderr.split("Traceback (most recent call last)")[1:]
    assert len(tracebacks) <= 1 and all("SignalException: Process" in text for text in tracebacks), stderr[-4000:]


# --- exact resume after SIGKILL ----------------------------------------------------------------------------


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, identity_shards):
    arguments = [
        *TINY_RUN,
        "--dataset",
        str(identity_shards),
        "--max-steps",
        "60",
        "--global-batch-size",
        "8",
        "--per-device-batch-size",
        "4",
        "--checkpoint-every",
        "5",
        "--keep-checkpoints",
        "2",
        "--dataloader-num-workers",
        "1",
        "--image-size",
        "48",
    ]
    env = subprocess_env(tmp_path)

    def run(output: Path, *extra: str) -> subprocess.CompletedProcess:
        completed = subprocess.run(
            [sys.executable, str(SCRIPT), *arguments, "--output-dir", str(output), *extra],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
            cwd=tmp_path,
        )
        assert completed.returncode == 0, completed.stderr[-6000:]
        return completed

    run(tmp_path / "uninterrupted")

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *arguments, "--output-dir", str(interrupted)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (interrupted / "checkpoints" / "step-00000005" / "progress.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the training process and its DataLoader worker
        process.wait()
    assert not (interrupted / "final").exists(), "killed too late: the run had finished"
    with open(interrupted / "training_log.jsonl", "a") as log:
        log.write('{"step": 99, "loss": 0.1')  # as if the kill had come in the middle of writing a line

    resumed = run(interrupted, "--resume-from-checkpoint", "latest")
    resumed_from = int(resumed.stdout.split("at step ")[1].split(".")[0])
    assert 5 <= resumed_from < 60

    expected = load_file(tmp_path / "uninterrupted" / "final" / "model.safetensors")
    actual = load_file(interrupted / "final" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)
    reference_log = [json.loads(line) for line in (tmp_path / "uninterrupted" / "training_log.jsonl").open()]
    resumed_log = [json.loads(line) for line in (interrupted / "training_log.jsonl").open()]
    assert [entry["step"] for entry in resumed_log] == list(range(1, 61))
    # Remaining steps x recent seconds per step: positive until the last step, which leaves nothing.
    assert all(entry["eta_seconds"] > 0 for entry in resumed_log[:-1]) and resumed_log[-1]["eta_seconds"] == 0
    assert [e["learning_rate"] for e in resumed_log] == [e["learning_rate"] for e in reference_log]
    np.testing.assert_allclose([e["loss"] for e in resumed_log], [e["loss"] for e in reference_log], rtol=1e-5)
    assert math.isclose(reference_log[0]["loss"], math.log(32), rel_tol=1e-6)  # zero head: uniform over 32 classes
    assert len(list((interrupted / "checkpoints").iterdir())) == 2  # the newest two kept, no half-written ones


def test_a_resume_that_would_not_be_exact_is_refused_naming_what_changed(tmp_path, identity_shards, capsys):
    from pretraining import pretrain

    common = [
        *TINY_RUN,
        "--dataset",
        str(identity_shards),
        "--max-steps",
        "2",
        "--global-batch-size",
        "8",
        "--checkpoint-every",
        "1",
        "--output-dir",
        str(tmp_path / "run"),
        "--resume-from-checkpoint",
        "latest",
    ]
    pretrain.train([*common, "--per-device-batch-size", "4"])
    reset_accelerate()
    with pytest.raises(
        InputError,
        match=r"per_device_batch_size \(--per-device-batch-size\) is 8 now, the checkpoint "
        r"used 4; gradient_accumulation_steps .* is 1 now, the checkpoint used 2",
    ):
        pretrain.train([*common, "--per-device-batch-size", "8"])
    reset_accelerate()
    with pytest.raises(InputError, match=r"recipe base_learning_rate is 0.5 now, the checkpoint used 1.0"):
        pretrain.train([*common, "--per-device-batch-size", "4", "--base-learning-rate", "0.5"])
    reset_accelerate()
    with pytest.raises(InputError, match=r"recipe horizontal_flip_probability is 0.0 now, the checkpoint used 0.5"):
        pretrain.train([*common, "--per-device-batch-size", "4", "--horizontal-flip-probability", "0"])

    checkpoint = completed_checkpoints(tmp_path / "run")[-1][1]
    progress = read_progress(checkpoint)
    signature = {key: progress[key] for key in RESUME_KEYS if key in progress}
    check_resumable(progress, signature, checkpoint)  # the same run: accepted
    with pytest.raises(
        InputError, match=r"num_processes \(the launcher's number of processes\) is 2 now, the checkpoint used 1"
    ):
        check_resumable(progress, {**signature, "num_processes": 2}, checkpoint)
    # The refusal names the launcher line that restores the checkpoint's processes (accelerate needs --multi_gpu).
    with pytest.raises(InputError, match=r"used 2 \(relaunch with accelerate launch --multi_gpu --num_processes 2 "):
        check_resumable({**progress, "num_processes": 2}, signature, checkpoint)

    # A run given a length before the warmup scaled with it (5,000 steps then): the flag that continues it is named.
    older = {**progress, "recipe": {**progress["recipe"], "warmup_steps": 5000}}
    with pytest.raises(InputError, match=r"warmup_steps is 0 now, the checkpoint used 5000 \(--warmup-steps 5000 "):
        check_resumable(older, signature, checkpoint)

    # Another intra-op thread count only changes the last bits: the resume runs, and says so.
    reset_accelerate()
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        pretrain.train([*common, "--per-device-batch-size", "4"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert (
        "Resumed from" in printed
        and (
            f"Warning: Resuming with intra-op threads (OMP_NUM_THREADS, torch.set_num_threads) is {threads + 1} now, the "
            f"checkpoint's run used {threads}. The run continues, but its weights will differ"
        )
        in printed
    )


def test_a_fresh_run_refuses_another_runs_checkpoints_and_damaged_checkpoints_are_explained(
    tmp_path, identity_shards, capsys
):
    from pretraining import pretrain

    run = tmp_path / "run"
    fresh = [
        *TINY_RUN,
        "--dataset",
        str(identity_shards),
        "--max-steps",
        "2",
        "--global-batch-size",
        "8",
        "--per-device-batch-size",
        "8",
        "--checkpoint-every",
        "1",
        "--output-dir",
        str(run),
    ]
    pretrain.train(fresh)
    first_run = {path.name: (path / "model.safetensors").read_bytes() for _, path in completed_checkpoints(run)}
    for arguments in ([], ["--resume-from-checkpoint", str(identity_shards)]):
        reset_accelerate()
        with pytest.raises(
            InputError,
            match=r"already holds 2 checkpoint\(s\) of another run \(newest step-00000002\)\. "
            r"Continue that run with --resume-from-checkpoint latest",
        ):
            pretrain.train([*fresh, "--seed", "1", *arguments])
    assert {
        path.name: (path / "model.safetensors").read_bytes() for _, path in completed_checkpoints(run)
    } == first_run

    reset_accelerate()
    pretrain.train([*fresh, "--seed", "1", "--overwrite-output-dir"])  # the seed-1 run's own checkpoints now
    assert read_progress(completed_checkpoints(run)[-1][1])["seed"] == 1
    assert {
        path.name: (path / "model.safetensors").read_bytes() for _, path in completed_checkpoints(run)
    } != first_run

    def refused(resume: str, message: str) -> None:
        reset_accelerate()
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            pretrain.main([*fresh, "--seed", "1", "--resume-from-checkpoint", resume])
        error = capsys.readouterr().err
        assert exited.value.code == 2 and "Traceback" not in error, error
        assert re.search(f"^pretrain: error: .*{message}", error, re.M), error

    newest, older = completed_checkpoints(run)[-1][1], completed_checkpoints(run)[0][1]
    (newest / "progress.json").write_text('{"step": 2, "se')
    refused("latest", r"progress.json cannot be read as JSON .*: the checkpoint is damaged")

    damaged = {
        name: run / "checkpoints" / f"step-0000001{index}" for index, name in enumerate(("pickle", "rng", "bad"))
    }
    for copy in damaged.values():
        shutil.copytree(older, copy)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):  # what a malicious optimizer.bin would run when unpickled
            return os.mkdir, (str(marker),)

    torch.save({"state": Payload()}, damaged["pickle"] / "optimizer.bin")
    (damaged["rng"] / "random_states_0.pkl").unlink()
    (damaged["bad"] / "random_states_0.pkl").write_bytes(b"not a pickle")
    (older / "model.safetensors").unlink()
    refused(
        str(older), r"step-00000001 is incomplete: the model weights .* are missing; expected the model, optimizer"
    )
    refused(
        str(damaged["pickle"]),
        r"optimizer.bin cannot be loaded as a checkpoint file \(UnpicklingError: .*never executed",
    )
    refused(str(damaged["rng"]), r"random_states_0.pkl, process 0's RNG state, is missing")
    refused(str(damaged["bad"]), r"random_states_0.pkl cannot be loaded as a checkpoint file")
    assert not marker.exists()  # refused, never executed


def test_an_output_dir_that_is_not_pretrainings_to_write_is_refused_before_anything_is_written(
    tmp_path, identity_shards
):
    from pretraining import pretrain

    run = [*TINY_RUN, "--dataset", str(identity_shards), "--max-steps", "1", "--global-batch-size", "8"]
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("someone's notes")
    (tmp_path / "a-file").write_text("")
    for output, extra, message in (
        ("/", [], r"--output-dir / is a filesystem root"),
        (str(home), [], r"holds files pre-training did not write \(notes.txt\); expected a new or empty folder"),
        (str(home), ["--overwrite-output-dir"], r"holds files pre-training did not write"),
        (str(tmp_path / "a-file" / "run"), [], r"a-file is a file; expected a folder"),
    ):
        reset_accelerate()
        with pytest.raises(InputError, match=message):
            pretrain.train([*run, "--output-dir", output, *extra])
    assert [path.name for path in home.iterdir()] == ["notes.txt"]
    assert not any(Path("/", name).exists() for name in ("checkpoints", "final", "training_log.jsonl"))


def test_a_torn_last_log_line_is_dropped_and_a_resume_truncates_the_log(tmp_path):
    log = tmp_path / "training_log.jsonl"
    for step in (1, 2, 3):
        append_training_log(log, {"step": step, "loss": 1.0 / step})
    with open(log, "ab") as stream:
        stream.write(b'{"step": 4, "lo')  # the process was killed in the middle of this line
    assert [entry["step"] for entry in read_training_log(log)] == [1, 2, 3]
    assert [entry["step"] for entry in truncate_training_log(log, 2)] == [1, 2]
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    append_training_log(log, {"step": 3, "loss": 0.25})
    assert [entry["step"] for entry in read_training_log(log)] == [1, 2, 3]
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(InputError, match="line 2 is not a JSON object"):
        read_training_log(log)


def test_bad_input_to_the_script_exits_with_a_message_not_a_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (
            ["--dataset", str(tmp_path / "missing")],
            "--dataset .*missing': could not load it with datasets.load_dataset .* Expected a Hub dataset id",
        ),
        (
            ["--train-dir", str(tmp_path / "empty")],
            "--train-dir must be a folder with one subfolder of images per class .*; no image files in .*empty",
        ),
    ]
    for arguments, message in cases:
        completed = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--model-preset",
                "bit-tiny",
                "--output-dir",
                str(tmp_path / "o"),
                *arguments,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=subprocess_env(tmp_path),
            cwd=tmp_path,
        )
        assert completed.returncode != 0
        assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
        last_line = completed.stderr.strip().splitlines()[-1]
        assert last_line.startswith("pretrain: error: ") and re.search(message, last_line), last_line


def test_streaming_resume_with_workers_continues_the_same_examples(tmp_path, identity_shards, monkeypatch):
    from pretraining import pretrain

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)  # see the test above

    arguments = [
        *TINY_RUN,
        "--dataset",
        str(identity_shards),
        "--streaming",
        "--num-labels",
        "32",
        "--max-steps",
        "8",
        "--global-batch-size",
        "4",
        "--per-device-batch-size",
        "2",
        "--checkpoint-every",
        "2",
        "--dataloader-num-workers",
        "2",
        "--shuffle-buffer-size",
        "8",
    ]
    uninterrupted = []
    pretrain.train(
        [*arguments, "--output-dir", str(tmp_path / "a")],
        on_batch=lambda step, batch: uninterrupted.append(batch["labels"].tolist()),
    )

    class Crash(Exception):
        """Stands in for a failure in the middle of step 5."""

    def crash_at_step_five(step, batch):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        pretrain.train([*arguments, "--output-dir", str(tmp_path / "b")], on_batch=crash_at_step_five)
    resumed = []
    result = pretrain.train(
        [*arguments, "--output-dir", str(tmp_path / "b"), "--resume-from-checkpoint", "latest"],
        on_batch=lambda step, batch: resumed.append(batch["labels"].tolist()),
    )
    # Checkpoint at step 4: micro-batches 8.. of the uninterrupted run (2 per step) come next, in order.
    assert resumed == uninterrupted[8:]
    assert len({label for batch in uninterrupted[:16] for label in batch}) == 32  # one full epoch first
    expected = load_file(tmp_path / "a" / "final" / "model.safetensors")
    for name, tensor in load_file(result.final / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-7)


# --- losses, bad data and the output folder ------------------------------------------------------------------


def test_multi_label_path_starts_at_the_negative_bias_loss(tmp_path):
    label_lists = [[0, 3], [1], [2, 4, 5], [5]] * 4
    features = datasets.Features(
        {"image": datasets.Image(), "labels": datasets.List(datasets.ClassLabel(names=[f"tag{i}" for i in range(6)]))}
    )
    folder = tmp_path / "multi"
    folder.mkdir()
    rows = {"image": [{"bytes": _png(i), "path": None} for i in range(16)], "labels": label_lists}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))

    from pretraining import pretrain

    common = [
        *TINY_RUN,
        "--dataset",
        str(folder),
        "--max-steps",
        "2",
        "--global-batch-size",
        "8",
        "--per-device-batch-size",
        "8",
    ]
    with pytest.raises(ValueError, match="pass --multi-label"):
        pretrain.train([*common, "--output-dir", str(tmp_path / "refused")])
    reset_accelerate()
    # The options a large run uses ride along: they must not change the path's numbers at the start.
    options = ["--mixed-precision", "bf16", "--gradient-checkpointing", "--channels-last"]
    result = pretrain.train([*common, *options, "--multi-label", "--output-dir", str(tmp_path / "out")])
    first = json.loads((tmp_path / "out" / "training_log.jsonl").read_text().splitlines()[0])
    # Zero head weights, bias -10: each positive costs softplus(10), each negative softplus(-10).
    positions = upstream_data.EpochStream(list(range(16)), seed=0)
    batch = [label_lists[positions.index_of(p)] for p in range(8)]
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = np.mean([len(y) * softplus(10) + (6 - len(y)) * softplus(-10) for y in batch])
    assert math.isclose(first["loss"], expected, rel_tol=1e-5)
    config = json.loads((result.final / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert json.loads((result.final / "bit_pretraining.json").read_text())["dataset"]["multi_label"] is True


def test_image_folder_run_skips_bad_files_and_writes_a_complete_final_folder(tmp_path, capsys):
    folder = tmp_path / "images"
    for split, per_class in (("train", 3), ("validation", 8)):
        for name in ("ant", "bee"):
            (folder / split / name).mkdir(parents=True)
            for index in range(per_class):
                (folder / split / name / f"{index}.png").write_bytes(_png(hash((split, name, index)) % 1000))
    (folder / "train" / "ant" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "train" / "bee" / "empty.png").write_bytes(b"")

    from pretraining import pretrain

    # 8 files, global batch 8, one step: every file is drawn exactly once. No --warmup-steps: the paper's 5,000
    # scaled with the run, to 0 of its 1 step.
    warmup = TINY_RUN.index("--warmup-steps")
    tiny_run = TINY_RUN[:warmup] + TINY_RUN[warmup + 2 :]
    result = pretrain.train(
        [
            *tiny_run,
            "--train-dir",
            str(folder),
            "--max-steps",
            "1",
            "--global-batch-size",
            "8",
            "--per-device-batch-size",
            "8",
            "--output-dir",
            str(tmp_path / "out"),
            "--validation-examples",
            "100",
        ]
    )
    final = result.final
    metadata = json.loads((final / "bit_pretraining.json").read_text())
    assert metadata["unreadable_images"] == 2
    assert sorted(Path(name).name for name in metadata["unreadable_image_names"]) == ["corrupt.jpg", "empty.png"]
    assert set(metadata) >= {
        "command",
        "recipe",
        "dataset",
        "steps",
        "global_batch_size",
        "final_loss",
        "bit_transfer_version",
    }
    assert metadata["dataset"] == {**metadata["dataset"], "num_examples": 8, "num_classes": 2, "multi_label": False}
    assert metadata["recipe"]["warmup_steps"] == 0 and metadata["recipe"]["momentum"] == 0.9
    assert metadata["warmup"]["steps"] == 0 and metadata["warmup"]["scaled_with_the_run"] is True
    assert (
        metadata["warmup"]["why"] in metadata["differences_from_paper"]
        and "--warmup-steps sets it" in metadata["warmup"]["why"]
    )
    assert "  - warmup: 0 steps, the paper's 5000 scaled with the run" in capsys.readouterr().out
    assert math.isfinite(metadata["final_loss"])
    log = [json.loads(line) for line in (final / "training_log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "learning_rate", "images_per_second", "eta_seconds"} <= set(log[-1])
    assert log[-1]["eta_seconds"] == 0  # the last step: nothing remains
    probe = json.loads((final / "probe_results.json").read_text())
    # 8 held out per class: 1-shot is tested on 14 images; 5-shot's 6 are too few to be a result.
    assert [(entry["step"], entry["examples_per_class"], entry["num_test_examples"]) for entry in probe] == [
        (1, 1, 14)
    ]
    assert log[-1]["probe_1shot_test_examples"] == 14 and "probe_5shot_accuracy" not in log[-1]
    assert 0.0 <= probe[0]["accuracy"] <= 1.0
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in final.iterdir()
    }

    image = np.asarray(Image.open(folder / "validation" / "ant" / "0.png"))
    stock = run_clean_python(f"""
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(final)!r}).eval()
        processor = AutoImageProcessor.from_pretrained({str(final)!r})
        image = Image.open({str(folder / "validation" / "ant" / "0.png")!r}).convert("RGB")
        with torch.no_grad():
            logits = model(**processor(image, return_tensors="pt")).logits
        result = {{"logits": logits[0].tolist(), "labels": model.config.id2label, "size": dict(processor.size)}}
    """)
    assert stock["labels"] == {"0": "ant", "1": "bee"} and stock["size"] == {"height": 32, "width": 32}
    from modeling_bit import BitForImageClassification, bit_image_processor

    ours = BitForImageClassification.from_pretrained(final).eval()
    with torch.no_grad():
        logits = ours(**bit_image_processor(32)(Image.fromarray(image), return_tensors="pt")).logits[0]
    np.testing.assert_allclose(logits.numpy(), stock["logits"], rtol=1e-4, atol=1e-5)


def test_the_script_runs_by_path_from_anywhere_with_readable_help(tmp_path):
    # By path the script's own folder is sys.path[0]; its imports resolve through the installed package (here: the
    # PYTHONPATH the tests run with), not through that folder, and it edits no sys.path.
    assert "sys.path" not in SCRIPT.read_text()
    env = {**subprocess_env(tmp_path), "COLUMNS": "120"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = completed.stdout
    assert "--resume-from-checkpoint latest|PATH" in text and "--per-device-batch-size N" in text
    assert "_" not in "".join(re.findall(r"--[\w-]+", text.split("options:")[1])), "underscore spellings in the help"
    assert not re.search(r"\(default: [^)]*\)[^\n]*\(default", text), "a default shown twice"
    for group in ("model:", "data (give --train-dir or --dataset):", "output, checkpoints, logs and probes:"):
        assert f"\n{group}\n" in text
    # The examples keep their lines (they used to be reflowed into one paragraph).
    assert "\n  torchrun --nproc_per_node 2 pretraining/pretrain.py" in text and len(text.splitlines()) < 110


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model-preset", "bit-huge"], "Unknown --model-preset"),
        (["--dataset", "x"], "exactly one of --train-dir"),
        (["--global-batch-size", "10", "--per-device-batch-size", "4"], "not a multiple of per-device batch 4"),
        (["--max-steps", "2", "--epochs", "1"], "--max-steps or --epochs"),
        (["--resume-from-checkpoint", "/nonexistent/step-1"], "not a complete checkpoint"),
        (["--image-size", "16"], "at least 32 pixels"),
        (
            ["--resume-from-checkpoint", "latest", "--overwrite-output-dir", "true"],
            "--overwrite-output-dir deletes the checkpoints",
        ),
        (["--base-learning-rate", "-0.1"], "--base-learning-rate -0.1: expected a positive number"),
        (["--momentum", "-0.9"], r"--momentum -0.9: expected a value in \[0, 1\)"),
        (["--weight-decay", "-0.0001"], "--weight-decay -0.0001: expected 0 or more"),
        (["--epochs", "0"], "--epochs 0.0: expected a positive number"),
        (["--decay-epochs", "95"], r"--decay-epochs 95: expected increasing epochs within \(0, 90\]"),
        (["--epochs", "10", "--decay-epochs", "0"], r"--decay-epochs 0: expected increasing epochs within \(0, 10\]"),
        (["--num-train-examples", "0"], "--num-train-examples 0: expected at least 1"),
        (["--probe-examples-per-class", "0"], "--probe-examples-per-class 0: expected at least 1"),
        (["--probe-classes", "-1"], "--probe-classes -1: expected at least 1"),
    ],
)
def test_bad_arguments_are_refused_before_training(tmp_path, arguments, message):
    from pretraining import pretrain

    merged = {
        "--model-preset": "bit-tiny",
        "--train-dir": str(tmp_path),
        "--output-dir": str(tmp_path / "o"),
        **dict(zip(arguments[0::2], arguments[1::2])),
    }
    argv = [item for pair in merged.items() for item in pair]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pretrain.train(argv)


def write_parquet(folder: Path, rows: dict, features: datasets.Features) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))
    return folder


SMALL_IMAGES = [{"bytes": _png(i), "path": None} for i in range(8)]


@pytest.mark.parametrize(
    "columns, arguments, message",
    [
        (
            {"label": (datasets.Value("string"), list("abababab"))},
            [],
            r"label column 'label' holds Value\('string'\): labels must be integer class ids \(0..C-1\) or a ClassLabel",
        ),
        (
            {"label": (datasets.Value("int64"), [0, 1] * 4)},
            ["--label-column", "image"],
            "label column 'image' holds Image.*: labels must be integer class ids",
        ),
        (
            {"label": (datasets.Value("int64"), [0, 1] * 4)},
            ["--image-column", "label"],
            r"image column 'label' holds Value\('int64'\): expected images",
        ),
        (
            {"label": (datasets.Value("int64"), [0, 1, 2, 3] * 2)},
            ["--num-labels", "2"],
            r"label column 'label' has class ids from 0 to 3: expected ids in 0..1",
        ),
        (
            {"label": (datasets.Value("int64"), [0, 1, -1, 1] * 2)},
            [],
            "has class ids from -1 to 1: expected ids in 0..1",
        ),
        (
            {"label": (datasets.Value("int64"), [0, 1] * 4)},
            ["--streaming", "--num-labels", "2", "--validation-examples", "100"],
            r"--validation-examples 100 held out the whole stream \(it has 8 examples\)",
        ),
    ],
)
def test_unusable_data_is_refused_before_training(tmp_path, columns, arguments, message):
    from pretraining import pretrain

    features = datasets.Features(
        {"image": datasets.Image(), **{name: feature for name, (feature, _) in columns.items()}}
    )
    rows = {"image": SMALL_IMAGES, **{name: values for name, (_, values) in columns.items()}}
    folder = write_parquet(tmp_path / "data", rows, features)
    with pytest.raises(InputError, match=message):
        pretrain.train(
            [
                *TINY_RUN,
                "--dataset",
                str(folder),
                "--max-steps",
                "1",
                "--global-batch-size",
                "4",
                "--per-device-batch-size",
                "4",
                "--output-dir",
                str(tmp_path / "out"),
                *arguments,
            ]
        )
    assert not (tmp_path / "out" / "final").exists()


def test_bad_labels_found_by_a_streams_worker_and_unreadable_steps_stop_the_script_with_a_message(
    tmp_path, monkeypatch, capsys
):
    from pretraining import pretrain

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)  # see the streaming tests above

    out_of_range = write_parquet(
        tmp_path / "range",
        {"image": SMALL_IMAGES, "label": [0, 1, 2, 3] * 2},
        datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    not_images = write_parquet(
        tmp_path / "paths",
        {"image": [f"missing-{i}.png" for i in range(8)], "label": [0, 1] * 4},
        datasets.Features({"image": datasets.Value("string"), "label": datasets.Value("int64")}),
    )
    cases = [
        (
            [out_of_range, "--streaming", "--num-labels", "2", "--dataloader-num-workers", "1"],
            r"^pretrain: error: Label ids \[.*\] outside 0..1.$",
        ),
        ([not_images], r"^pretrain: error: None of the images of step 1 could be read \(e.g. missing-\d.png"),
    ]
    for (folder, *arguments), message in cases:
        reset_accelerate()
        with pytest.raises(SystemExit) as exited:
            pretrain.main(
                [
                    *TINY_RUN,
                    "--dataset",
                    str(folder),
                    "--max-steps",
                    "1",
                    "--global-batch-size",
                    "4",
                    "--per-device-batch-size",
                    "4",
                    "--output-dir",
                    str(tmp_path / f"{folder.name}-out"),
                    *arguments,
                ]
            )
        error = capsys.readouterr().err
        assert exited.value.code == 2 and re.search(message, error, re.M) and "Traceback" not in error, error


def test_synthetic_glyphs_are_deterministic_many_class_data_pretrain_reads(tmp_path):
    from pretraining import synthetic

    first = synthetic.main(
        ["--output-dir", str(tmp_path / "a"), "--num-classes", "6", "--examples-per-class", "3", "--num-shards", "2"]
    )
    second = synthetic.write_dataset(tmp_path / "b", num_classes=6, examples_per_class=3, num_shards=2)
    shards = sorted(p.name for p in first.iterdir())
    assert shards == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in shards)
    source = upstream_data.load_upstream_data(dataset=str(first), validation_examples=0)
    assert source.num_train_examples == 18 and source.labels.names == [f"glyph-{i:04d}" for i in range(6)]
    assert sorted(source.train["label"]) == sorted(list(range(6)) * 3)
    batch = upstream_data.BatchBuilder("image", "label", source.labels, 32, 0, train=True)(
        [(example, (index,)) for index, example in enumerate(source.train)]
    )
    assert batch["pixel_values"].shape == (18, 3, 32, 32) and not batch["unreadable"]
    # Examples of one class differ (handwriting-like variation); the classes differ from each other.
    pixels = batch["pixel_values"].flatten(1)
    assert torch.cdist(pixels, pixels).triu(1)[torch.ones(18, 18).triu(1).bool()].min() > 1.0


# --- the embedded upstream checkpoint ---------------------------------------------------------------------------


def test_embedded_checkpoint_is_a_small_complete_bit_tiny_folder():
    folder = embedded_checkpoint_path()
    assert folder.is_dir()
    assert (folder / "model.safetensors").stat().st_size <= 10 * 2**20
    config = json.loads((folder / "config.json").read_text())
    from modeling_bit import BitConfig

    tiny = BitConfig.from_preset("bit-tiny")
    assert (config["depths"], config["hidden_sizes"], config["embedding_size"]) == (
        tiny.depths,
        tiny.hidden_sizes,
        tiny.embedding_size,
    )
    assert len(config["id2label"]) >= 100  # many upstream classes
    metadata = json.loads((folder / "bit_pretraining.json").read_text())
    assert metadata["command"][0].endswith("pretrain.py") and metadata["steps"] > 0
    assert json.loads((folder / "preprocessor_config.json").read_text())["do_center_crop"] is False
    assert (folder / "README.md").read_text().startswith("---")
    probe = json.loads((folder / "probe_results.json").read_text())
    assert probe and {"step", "examples_per_class", "accuracy"} <= set(probe[-1])
    from modeling_bit import BitForImageClassification, bit_image_processor

    model = BitForImageClassification.from_pretrained(folder).eval()
    glyph = Image.new("RGB", (40, 40), "white")
    with torch.no_grad():
        logits = model(**bit_image_processor(48)(glyph, return_tensors="pt")).logits
    assert logits.shape == (1, len(config["id2label"])) and torch.isfinite(logits).all()


def test_embedded_checkpoint_card_is_what_write_model_card_writes_today(tmp_path):

    from model_cards import write_model_card

    copy = tmp_path / embedded_checkpoint_path().name  # the card is named after its folder
    shutil.copytree(embedded_checkpoint_path(), copy)
    (copy / "README.md").unlink()
    write_model_card(copy)
    # If this fails, the card template changed: run write_model_card on the embedded folder (regenerate.sh does).
    assert (copy / "README.md").read_text() == (embedded_checkpoint_path() / "README.md").read_text()


@pytest.mark.parametrize(
    "name, distributed_type",
    [("multi_gpu.yaml", "MULTI_GPU"), ("fsdp_r152x4.yaml", "FSDP"), ("tpu.yaml", "XLA")],
)
def test_example_accelerate_configs_load_with_accelerate(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO_ROOT / "pretraining" / "configs" / name))
    assert config.distributed_type.value == distributed_type and config.mixed_precision == "bf16"
    if distributed_type == "FSDP":
        from modeling_bit import BitPreTrainedModel

        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] in BitPreTrainedModel._no_split_modules
