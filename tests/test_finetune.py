"""Fine-tuning: BiT-HyperRule, BitTrainer (schedule, MixUp), data protocols, bad input, resume, the CLI."""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, randomize_, run_clean_python
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from finetune import cli
from finetune.data import (
    few_shot_indices,
    from_images,
    load_hub_dataset,
    load_image_folders,
    median_image_area,
    stratified_split,
)
from finetune.engine import training_inputs
from finetune.errors import FinetuneInputError
from finetune.hyperrule import (
    BitHyperRule,
    choose_micro_batch_size,
    learning_rate_multiplier,
    training_memory_per_example,
)
from finetune.main_job import run_main_job
from finetune.metrics import ClassificationMetrics
from finetune.models import load_model_for_labels
from finetune.output_folder import write_output_folder
from finetune.preprocessing import DecodedImages, HyperRuleTrainingStream, ImageBatchCollator, preprocess
from finetune.trainer import BitTrainer, BitTrainingArguments, mixup_lambda, mixup_permutation
from modeling_bit import BitConfig, BitForImageClassification, bit_image_processor
from modeling_bit.folder_layout import folder_resolution

CONTRACT_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "README.md",
    "all_results.json",
    "eval_results.json",
    "bit_hyperrule.json",
    "bit_finetune_args.json",
    "training_log.json",
)
HYPERRULE_KEYS = {
    "dataset_size",
    "median_image_area",
    "precrop",
    "crop",
    "steps",
    "warmup_steps",
    "decay_steps",
    "mixup_alpha",
    "learning_rate",
    "batch_size",
    "micro_batch_size",
    "overrides",
}


def assert_complete_folder(folder: Path) -> None:
    """Every file the contract names (the model card may add its plots), no leftover checkpoints or staging."""
    names = {path.name for path in folder.iterdir()}
    assert set(CONTRACT_FILES) <= names, set(CONTRACT_FILES) - names
    assert "checkpoints" not in names and not any(name.startswith(".") for name in names), names


# Small CPU runs: few steps, small batches, 32 px.
SMALL_RUN = ["--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "4", "--resolution", "40", "32"]


def write_image_folder(root: Path, counts: dict[str, int], size=(20, 16), seed=0) -> Path:
    """Class subfolders of small PNGs whose colour depends on the class (so the task is learnable)."""
    rng = np.random.default_rng(seed)
    for index, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for item in range(count):
            base = np.zeros((size[1], size[0], 3), np.uint8)
            base[..., index % 3] = 200
            noise = rng.integers(0, 40, base.shape, dtype=np.uint8)
            Image.fromarray(base + noise).save(root / name / f"{item}.png")
    return root


# --- BiT-HyperRule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, steps, warmup, mixup",
    [(19_999, 500, 100, 0.0), (20_000, 10_000, 500, 0.1), (499_999, 10_000, 500, 0.1), (500_000, 20_000, 500, 0.1)],
)
def test_schedule_and_mixup_switch_at_the_paper_boundaries(size, steps, warmup, mixup):
    rule = BitHyperRule.from_dataset(size, 200 * 200)
    assert (rule.steps, rule.warmup_steps, rule.mixup_alpha) == (steps, warmup, mixup)
    assert rule.decay_steps == (0.3 * steps, 0.6 * steps, 0.9 * steps)
    assert (rule.learning_rate, rule.batch_size, rule.momentum, rule.weight_decay) == (0.003, 512, 0.9, 0.0)
    assert rule.overrides == ()


def test_resolution_switches_at_96x96_measured_from_the_image_headers(tmp_path):
    # 95 x 97 = 9215 < 96^2 = 9216 < 97 x 96 = 9312 pixels.
    for name, size in (("under", (95, 97)), ("over", (97, 96))):
        write_image_folder(tmp_path / name, {"a": 3, "b": 4}, size=size)
    under = load_image_folders(tmp_path / "under", validation_fraction=0.34)
    over = load_image_folders(tmp_path / "over", validation_fraction=0.34)
    assert median_image_area(under.train)[0] == 95 * 97
    assert median_image_area(over.train)[0] == 97 * 96
    rule_under = BitHyperRule.from_dataset(len(under.train), median_image_area(under.train)[0])
    rule_over = BitHyperRule.from_dataset(len(over.train), median_image_area(over.train)[0])
    assert (rule_under.precrop, rule_under.crop) == (160, 128)
    assert (rule_over.precrop, rule_over.crop) == (448, 384)
    assert (BitHyperRule.from_dataset(10, 96 * 96 - 1).crop, BitHyperRule.from_dataset(10, 96 * 96).crop) == (128, 384)
    bit_l = BitHyperRule.from_dataset(10, 96 * 96, large_resolution=(512, 480))
    assert (bit_l.precrop, bit_l.crop) == (512, 480)


def test_overrides_are_recorded_and_derived_fields_follow(tmp_path):
    rule = BitHyperRule.from_dataset(1000, 64, steps=100, batch_size=64, micro_batch_size=16)
    assert rule.overrides == ("steps", "batch_size", "micro_batch_size")
    assert rule.warmup_steps == 20  # the small-task warmup fraction, 100/500
    assert rule.decay_steps == (30, 60, 90)
    assert rule.learning_rate == pytest.approx(0.003 * 64 / 512)  # linear scaling with the batch
    assert "64/512" in rule.learning_rate_reason and "§3.3" in rule.learning_rate_reason
    given = BitHyperRule.from_dataset(1000, 64, batch_size=64, learning_rate=0.01)
    assert given.learning_rate == 0.01 and given.overrides == ("learning_rate", "batch_size")
    record = json.loads(rule.save(tmp_path).read_text())
    assert set(record) >= HYPERRULE_KEYS
    assert record["overrides"] == ["steps", "batch_size", "micro_batch_size"]
    with pytest.raises(FinetuneInputError, match="crop=200 is larger than precrop=160"):
        BitHyperRule.from_dataset(1000, 64, crop=200)


def test_meta_device_memory_estimate_equals_the_real_saved_activations():
    model = BitForImageClassification(BitConfig.from_preset("bit-tiny")).train()
    per_example, fixed = training_memory_per_example(model, 32)
    measured = []
    for batch in (1, 3):
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(torch.randn(batch, 3, 32, 32)).logits.sum()
        measured.append(total)
    assert measured == [fixed + per_example, fixed + 3 * per_example]


def test_micro_batch_keeps_the_effective_batch_when_memory_is_short(tmp_path):
    model = BitForImageClassification(BitConfig.from_preset("bit-tiny"))
    per_example, _ = training_memory_per_example(model, 128)
    roomy = choose_micro_batch_size(model, 128, 512, "cpu", available_bytes=10**12)
    tight = choose_micro_batch_size(model, 128, 512, "cpu", available_bytes=40 * per_example)
    assert roomy == 512
    assert 1 <= tight < 512 and 512 % tight == 0
    assert tight * per_example * 2 <= 0.5 * 40 * per_example < 2 * tight * per_example * 2
    rule = BitHyperRule.from_dataset(1000, 64).with_micro_batch_size(tight)
    args = BitTrainingArguments.from_hyperrule(rule, str(tmp_path))
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 512
    assert rule.overrides == ()  # a chosen micro-batch is not an override
    with pytest.raises(FinetuneInputError, match="not a multiple"):
        BitHyperRule.from_dataset(1000, 64, micro_batch_size=100).gradient_accumulation_steps()
    # Any divisor of the batch, not only powers of two: a batch of 96 that fits is one micro-batch.
    assert choose_micro_batch_size(model, 128, 96, "cpu", available_bytes=10**12) == 96
    _, fixed = training_memory_per_example(model, 128)
    overhead = 3 * sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()) + fixed
    # Half the memory holds 28 examples' activations (x2 for backward): 12 fits, 16 does not (powers of two: 8).
    assert choose_micro_batch_size(model, 128, 96, "cpu", available_bytes=2 * (2 * 14 * per_example + overhead)) == 12


def test_mixup_with_a_one_image_micro_batch_warns_that_it_mixes_nothing(tmp_path):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("finetune.trainer").addHandler(handler)
    try:
        for micro_batch in (1, 2):
            rule = BitHyperRule.from_dataset(1000, 64, batch_size=4, micro_batch_size=micro_batch, mixup_alpha=0.1)
            model = BitForImageClassification(BitConfig.from_preset("bit-tiny"))
            BitTrainer(model, BitTrainingArguments.from_hyperrule(rule, str(tmp_path)))
    finally:
        logging.getLogger("finetune.trainer").removeHandler(handler)
    assert len(messages) == 1 and "micro-batch is 1 image" in messages[0] and "MixUp has no effect" in messages[0]


def test_trainer_builds_sgd_and_the_staircase_schedule_from_the_rule(tmp_path):
    rule = BitHyperRule.from_dataset(1000, 64, micro_batch_size=512)
    model = BitForImageClassification(BitConfig.from_preset("bit-tiny"))
    trainer = BitTrainer(model, hyperrule=rule, output_dir=str(tmp_path))
    trainer.create_optimizer_and_scheduler(num_training_steps=rule.steps)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    group = trainer.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 0.0)
    assert trainer.args.max_steps == 500 and trainer.args.max_grad_norm == 0
    learning_rates = []
    for _ in range(rule.steps):
        learning_rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    # Warmup over 100 steps, then 0.003, x0.1 at 150, 300 and 450.
    assert learning_rates[50] == pytest.approx(0.003 * 50 / 100)
    expected = {
        99: 0.003 * 0.99,
        100: 0.003,
        149: 0.003,
        150: 3e-4,
        299: 3e-4,
        300: 3e-5,
        449: 3e-5,
        450: 3e-6,
        499: 3e-6,
    }
    assert {step: learning_rates[step] for step in expected} == pytest.approx(expected)
    assert learning_rate_multiplier(
        450, warmup_steps=100, decay_steps=(150, 300, 450), decay_factor=0.1
    ) == pytest.approx(1e-3)


# --- MixUp -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("multi_label", [False, True])
def test_mixup_loss_is_the_lambda_weighted_sum_of_the_two_losses(tmp_path, multi_label):
    torch.manual_seed(0)
    config = BitConfig.from_preset("bit-tiny", num_labels=4)
    if multi_label:
        config.problem_type = "multi_label_classification"
    model = randomize_(BitForImageClassification(config)).train()
    args = BitTrainingArguments(output_dir=str(tmp_path), mixup_alpha=0.4, seed=7, report_to="none")
    trainer = BitTrainer(model, args)
    pixel_values = torch.randn(6, 3, 32, 32)
    labels = (torch.rand(6, 4) < 0.5).float() if multi_label else torch.tensor([0, 1, 2, 3, 1, 2])

    loss = trainer.compute_loss(model, {"pixel_values": pixel_values, "labels": labels})

    lam = mixup_lambda(0.4, seed=7, step=0)
    permutation = mixup_permutation(6, seed=7, step=0, micro_batch=0)
    assert 0 < lam < 1 and not torch.equal(permutation, torch.arange(6))
    logits = model(lam * pixel_values + (1 - lam) * pixel_values[permutation]).logits
    if multi_label:
        expected = lam * F.binary_cross_entropy_with_logits(logits, labels) + (
            1 - lam
        ) * F.binary_cross_entropy_with_logits(logits, labels[permutation])
    else:
        expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[permutation])
    torch.testing.assert_close(loss, expected)

    # One lambda per optimizer step, shared by its micro-batches; a new one at the next step.
    second_lambda, second_permutation = trainer.mixup_draw(6)
    assert second_lambda == lam and not torch.equal(second_permutation, permutation)
    trainer.state.global_step = 1
    assert trainer.mixup_draw(6)[0] == mixup_lambda(0.4, seed=7, step=1) != lam

    # Evaluation never mixes.
    model.eval()
    eval_loss = trainer.compute_loss(model, {"pixel_values": pixel_values, "labels": labels})
    torch.testing.assert_close(eval_loss, model(pixel_values, labels=labels).loss)


# --- Data protocols ------------------------------------------------------------------------------


def test_few_shot_subsets_are_balanced_and_seeded():
    labels = np.repeat(np.arange(4), [30, 12, 50, 7])
    first = few_shot_indices(labels, 5, seed=3)
    assert np.array_equal(first, few_shot_indices(labels, 5, seed=3))
    assert not np.array_equal(first, few_shot_indices(labels, 5, seed=4))
    assert np.bincount(labels[first]).tolist() == [5, 5, 5, 5]
    assert len(set(first.tolist())) == 20
    with pytest.raises(FinetuneInputError, match="larger than the smallest class: 'd' has 7"):
        few_shot_indices(labels, 8, seed=0, label_names=["a", "b", "c", "d"])


def test_held_out_split_is_stratified_deterministic_and_announced(tmp_path):
    labels = np.repeat(np.arange(3), [40, 20, 10])
    train, held_out = stratified_split(labels, 0.2, seed=1)
    assert np.bincount(labels[held_out]).tolist() == [8, 4, 2]
    assert sorted(np.concatenate([train, held_out]).tolist()) == list(range(70))
    assert np.array_equal(held_out, stratified_split(labels, 0.2, seed=1)[1])
    data = load_image_folders(write_image_folder(tmp_path, {"a": 10, "b": 10}), validation_fraction=0.2)
    assert (len(data.train), len(data.eval)) == (16, 4)
    assert "holding out 4 of 20" in data.announcements[0] and "stratified" in data.announcements[0]


def test_metrics_come_from_the_shipped_evaluate_modules():
    from transformers import EvalPrediction

    logits = np.array(
        [[5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 9, 1, 1, 1, 1], [1, 2, 3, 4, 5, 9]], dtype=np.float32
    )
    references = np.array([0, 0, 1, 5])
    metrics = ClassificationMetrics([str(i) for i in range(6)], per_class=True)(EvalPrediction(logits, references))
    assert metrics["accuracy"] == 0.75  # rows 0, 2, 3
    assert metrics["top_5_accuracy"] == 0.75  # row 1: class 0 has the lowest score
    assert metrics["per_class_accuracy"] == {"0": 0.5, "1": 1.0, "2": None, "3": None, "4": None, "5": 1.0}
    two_classes = ClassificationMetrics(["a", "b"])(EvalPrediction(logits[:, :2], np.array([0, 0, 1, 0])))
    assert "top_5_accuracy" not in two_classes and two_classes["accuracy"] == 0.5


def test_new_head_is_zero_unless_the_labels_are_the_checkpoints(tmp_path):
    config = BitConfig.from_preset("bit-tiny", id2label={0: "cat", 1: "dog", 2: "fox"})
    randomize_(BitForImageClassification(config)).save_pretrained(tmp_path)
    same = load_model_for_labels(tmp_path, ["cat", "dog", "fox"])
    other_names = load_model_for_labels(tmp_path, ["ant", "bee", "wasp"])
    other_count = load_model_for_labels(tmp_path, ["ant", "bee"])
    assert same.classifier[-1].weight.abs().sum() > 0
    for model in (other_names, other_count):
        assert model.classifier[-1].weight.abs().sum() == 0 and model.classifier[-1].bias.abs().sum() == 0
        assert model.bit.norm.weight.equal(same.bit.norm.weight)  # the backbone is the checkpoint's
    assert other_count.config.id2label == {0: "ant", 1: "bee"}


def test_a_checkpoint_of_another_architecture_is_refused_clearly(tmp_path):
    from transformers import ViTConfig

    ViTConfig(num_labels=2).save_pretrained(tmp_path)
    for from_scratch in (False, True):
        with pytest.raises(FinetuneInputError, match="expected a BiT checkpoint.*model_type 'vit'"):
            load_model_for_labels(tmp_path, ["a", "b"], from_scratch=from_scratch)


@pytest.mark.parametrize(
    "size, resolution",
    [({"height": 48, "width": 48}, 48), ({"shortest_edge": 64}, 64), ({"longest_edge": 80}, 80), (96, 96), ({}, None)],
)
def test_main_job_reads_the_checkpoint_resolution_from_any_size_form(tmp_path, size, resolution):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": size}))
    assert folder_resolution(tmp_path) == resolution


def test_training_augmentation_crops_flips_and_can_be_turned_off(tmp_path):
    folder = write_image_folder(tmp_path, {"a": 3, "b": 3}, size=(30, 20))
    data = load_image_folders(folder, validation_fraction=0.34)
    rule = BitHyperRule.from_dataset(len(data.train), 600, precrop=40, crop=32, steps=10, batch_size=4)

    def views_of_one_image(flip: bool, random_crop: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the stored image, what 12 training positions see of it), the augmentation as the rule records it."""
        augmented = dataclasses.replace(rule, horizontal_flip=flip, random_crop=random_crop)
        stream, _ = training_inputs(data.train, augmented, seed=0, num_workers=0)
        assert (stream.flip, stream.random_crop) == (flip, random_crop)
        one = HyperRuleTrainingStream(
            stream.source.select([0]), 12, crop=32, seed=0, flip=flip, random_crop=random_crop
        )
        return one.source.pixel_values[0], [one[position]["pixel_values"] for position in range(12)]

    # Neither crop nor flip: the training view is exactly the evaluation preprocessing.
    stored, views = views_of_one_image(flip=False, random_crop=False)
    first_image = Image.open(data.train[0]["image"]["path"])
    torch.testing.assert_close(stored, bit_image_processor(32)(first_image, return_tensors="pt")["pixel_values"][0])
    assert all(torch.equal(view, stored) for view in views)
    # Flip only: the image or its mirror, both occurring.
    stored, views = views_of_one_image(flip=True, random_crop=False)
    mirrored = [torch.equal(view, stored.flip(-1)) for view in views]
    assert all(m or torch.equal(view, stored) for m, view in zip(mirrored, views)) and 0 < sum(mirrored) < 12
    # Random crop: 32x32 windows of the 40x40 resize, at several offsets.
    stored, views = views_of_one_image(flip=False, random_crop=True)
    assert stored.shape == (3, 40, 40)
    windows = stored.unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 9, 32, 32)
    offsets = [
        [(top, left) for top in range(9) for left in range(9) if torch.equal(windows[:, top, left], view)]
        for view in views
    ]
    assert all(offsets) and len({found[0] for found in offsets}) > 1


@pytest.mark.parametrize("flip, random_crop", [(True, True), (False, True), (True, False)])
def test_the_dataloaders_batched_fetch_sees_what_position_by_position_reads_see(tmp_path, flip, random_crop):
    folder = write_image_folder(tmp_path, {"a": 3, "b": 3}, size=(30, 20))
    data = load_image_folders(folder, validation_fraction=0.34)
    rule = BitHyperRule.from_dataset(len(data.train), 600, precrop=40, crop=32, steps=6, batch_size=4)
    augmented = dataclasses.replace(rule, horizontal_flip=flip, random_crop=random_crop)
    stream, _ = training_inputs(data.train, augmented, seed=3, num_workers=0)
    collate = ImageBatchCollator(32)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, collate_fn=collate)  # fetches by __getitems__
    batches = list(loader)
    assert len(batches) == 6 and batches[0]["pixel_values"].shape[1:] == (3, 32, 32)
    for number, batch in enumerate(batches):  # several epochs of the 4 training images, in their seeded orders
        one_by_one = collate([stream[position] for position in range(4 * number, 4 * number + 4)])
        assert torch.equal(batch["pixel_values"], one_by_one["pixel_values"]), number
        assert torch.equal(batch["labels"], one_by_one["labels"]), number
    with pytest.raises(IndexError):
        stream.__getitems__([0, len(stream)])


# --- Bad images and bad input ------------------------------------------------------------------------


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression-bomb sized header)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17 : ihdr + 21] = zlib.crc32(bytes(data[ihdr : ihdr + 17])).to_bytes(4, "big")
    return bytes(data)


def write_bad_image_corpus(root: Path) -> tuple[Path, set[str]]:
    """Two classes of odd-but-valid images plus four unusable files; returns (folder, unusable names)."""
    write_image_folder(root, {"left": 3, "right": 3})
    left, right = root / "left", root / "right"
    Image.new("P", (24, 24), 3).save(left / "palette.png")
    Image.new("RGBA", (24, 24), (255, 0, 0, 128)).save(left / "rgba.png")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(right / "cmyk.jpg")
    Image.fromarray(np.full((24, 24), 40000, np.uint16)).save(right / "gray16.png")
    # Stored 16 wide x 32 high, left half red; EXIF orientation 6 (rotate 90° clockwise to view) makes it
    # 32 wide x 16 high with the red on top.
    stored = np.zeros((32, 16, 3), np.uint8)
    stored[:, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(right / "exif_rotated.jpg", exif=exif, quality=95)
    (left / "zero_bytes.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, format="JPEG")
    (left / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (right / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    (right / "bomb.png").write_bytes(_png_with_header_size(40_000, 40_000))
    bad = {
        str(left / "zero_bytes.jpg"),
        str(left / "truncated.jpg"),
        str(right / "notes.jpg"),
        str(right / "bomb.png"),
    }
    return root, bad


def test_unreadable_images_are_skipped_and_named_and_odd_modes_converted(tmp_path):
    folder, bad = write_bad_image_corpus(tmp_path / "corpus")
    data = load_image_folders(folder, validation_fraction=0.2)
    everything = datasets.concatenate_datasets([data.train, data.eval])
    assert len(everything) == 15
    in_memory = preprocess(everything, 32, num_workers=2)
    assert set(in_memory.unreadable) == bad
    assert len(in_memory) == 11 and in_memory.pixel_values.shape[1:] == (3, 32, 32)
    # The same through worker processes batch by batch (the path of sets too large for memory).
    loader = torch.utils.data.DataLoader(
        DecodedImages(everything, 32), batch_size=4, num_workers=2, collate_fn=ImageBatchCollator(32)
    )
    batches = list(loader)
    assert {name for batch in batches for name in batch["unreadable_images"]} == bad
    assert sum(len(batch["labels"]) for batch in batches) == 11
    # EXIF orientation applied: red on top, not on the left.
    paths = [entry["path"] for entry in everything["image"]]
    rotated = DecodedImages(everything, 32)[paths.index(str(folder / "right" / "exif_rotated.jpg"))]["pixel_values"]
    red = rotated[0] - rotated[1:].mean(0)
    assert red[:12].mean() > 0.5 and red[20:].mean() < 0.1
    # 16-bit grey 40000/65535 becomes 8-bit ~156, not clipped white.
    gray = DecodedImages(everything, 32)[paths.index(str(folder / "right" / "gray16.png"))]["pixel_values"]
    assert gray.mean().item() == pytest.approx(2 * 40000 / 65535 - 1, abs=0.02)


def test_a_run_over_bad_images_completes_and_reports_them(tmp_path, tiny_checkpoint, capsys):
    folder, bad = write_bad_image_corpus(tmp_path / "corpus")
    output = tmp_path / "out"
    status = cli.main(
        [
            "--model",
            str(tiny_checkpoint),
            "--train-dir",
            str(folder),
            "--output-dir",
            str(output),
            "--validation-fraction",
            "0.2",
            "--num-workers",
            "0",
            *SMALL_RUN,
        ]
    )
    assert status == 0
    recorded = json.loads((output / "bit_finetune_args.json").read_text())
    assert set(recorded["unreadable_images"]) == bad
    assert json.loads((output / "all_results.json").read_text())["unreadable_images"] == 4
    assert "Skipped 4 unreadable image(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make_input, extra, message",
    [
        (lambda root: write_image_folder(root, {"only": 4}), [], "found one class ('only')"),
        (lambda root: root.mkdir() or root, [], "no image files in"),
        (lambda root: write_image_folder(root, {"a": 6, "b": 3}), ["--examples-per-class", "4"], "'b' has 3"),
        (
            lambda root: write_image_folder(root, {"a": 8, "b": 8}),
            ["--model", "/no/such/model"],
            "--model '/no/such/model'",
        ),
        (
            lambda root: write_image_folder(root, {"a": 8, "b": 8}),
            ["--batch-size", "8", "--micro-batch-size", "3"],
            "batch_size=8 is not a multiple of micro_batch_size=3",
        ),
        (
            lambda root: write_image_folder(root, {"a": 8, "b": 8}),
            ["--resolution", "30", "24"],
            "crop=24: expected at least 32",
        ),
        (lambda root: write_image_folder(root, {"a": 8, "b": 8}), ["--seed", "-1"], "--seed -1: expected an integer"),
        (lambda root: write_image_folder(root, {"a": 8, "b": 8}), ["--save-steps", "0"], "--save-steps 0: expected"),
    ],
    ids=[
        "single-class",
        "empty-folder",
        "k-larger-than-smallest-class",
        "unloadable-model",
        "micro-batch-not-dividing",
        "crop-below-network-minimum",
        "negative-seed",
        "zero-save-steps",
    ],
)
def test_bad_folders_are_refused_before_training(tmp_path, tiny_checkpoint, capsys, make_input, extra, message):
    folder = make_input(tmp_path / "data")
    output = tmp_path / "out"
    status = cli.main(
        ["--model", str(tiny_checkpoint), "--train-dir", str(folder), "--output-dir", str(output), *extra]
    )
    assert status == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def _write_parquet_dataset(root: Path, splits: dict[str, int], columns=("image", "label")) -> Path:
    """A local datasets folder (parquet per split) with encoded images and class labels."""
    rng = np.random.default_rng(0)
    for split, count in splits.items():
        labels = [index % 2 for index in range(count)]
        images = [
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8) // (1 + label)) for label in labels
        ]
        dataset = from_images(images, labels, ["even", "odd"]).rename_columns(dict(zip(("image", "label"), columns)))
        dataset.to_parquet(str(root / f"{split}.parquet"))
    return root


def test_a_missing_label_column_is_refused_with_the_columns_listed(tmp_path, tiny_checkpoint, capsys):
    root = _write_parquet_dataset(tmp_path, {"train": 8}, columns=("img", "target"))
    status = cli.main(
        [
            "--model",
            str(tiny_checkpoint),
            "--dataset",
            str(root),
            "--image-column",
            "img",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert status == 2
    assert "no column 'label' (--label-column); the columns are ['img', 'target']" in capsys.readouterr().err


def test_more_bad_input_is_refused_before_anything_is_written(tmp_path, tiny_checkpoint, capsys):
    root = _write_parquet_dataset(tmp_path / "data", {"train": 8})
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "torn" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torn" / "checkpoints" / "run.json").write_text("{trunc")
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    pyarrow.parquet.write_table(
        pyarrow.table({"image": [str(tmp_path / "x.png")] * 3, "label": ["cat", None, "dog"]}),
        unlabelled / "train.parquet",
    )
    for arguments, message in [
        (
            ["--dataset", str(root), "--output-dir", str(tmp_path / "a-file" / "out")],
            "a-file is a file; expected a folder",
        ),
        (
            ["--dataset", str(root), "--dataset-config", "nope", "--output-dir", str(tmp_path / "out")],
            "--dataset-config 'nope': could not load it",
        ),
        (["--dataset", str(unlabelled), "--output-dir", str(tmp_path / "out")], "has 1 missing label(s)"),
        (["--dataset", str(root), "--output-dir", str(tmp_path / "torn"), "--resume"], "run.json is not readable"),
    ]:
        assert cli.main(["--model", str(tiny_checkpoint), *arguments]) == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, error
    assert not (tmp_path / "out").exists()


def test_streamed_dataset_with_named_columns_trains(tmp_path, tiny_checkpoint):
    root = _write_parquet_dataset(tmp_path / "data", {"train": 16, "test": 6}, columns=("img", "target"))
    data = load_hub_dataset(str(root), image_column="img", label_column="target", streaming=True)
    assert isinstance(data.train, datasets.IterableDataset) and data.label_names == ["even", "odd"]
    assert "'test' split" in data.announcements[0]
    output = tmp_path / "out"
    status = cli.main(
        [
            "--model",
            str(tiny_checkpoint),
            "--dataset",
            str(root),
            "--image-column",
            "img",
            "--label-column",
            "target",
            "--streaming",
            "--dataset-size",
            "16",
            "--num-workers",
            "2",
            "--output-dir",
            str(output),
            *SMALL_RUN,
        ]
    )
    assert status == 0
    hyperrule = json.loads((output / "bit_hyperrule.json").read_text())
    assert hyperrule["dataset_size"] == 16 and "dataset_size" in hyperrule["overrides"]
    assert json.loads((output / "eval_results.json").read_text())["eval_samples"] == 6  # counted while streaming
    history = json.loads((output / "training_log.json").read_text())["log_history"]
    assert max(entry.get("step", 0) for entry in history) == 4


# --- Resume ------------------------------------------------------------------------------------------


class InterruptAfterSave(TrainerCallback):
    """Stops the process right after the checkpoint at `step` is written (as a kill would)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"interrupted after the checkpoint of step {self.step}")


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_checkpoint, capsys):
    folder = write_image_folder(tmp_path / "data", {"a": 6, "b": 6, "c": 6})
    run = [
        "--model",
        str(tiny_checkpoint),
        "--train-dir",
        str(folder),
        "--max-steps",
        "6",
        "--save-steps",
        "2",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--resolution",
        "40",
        "32",
        "--mixup-alpha",
        "0.4",
        "--learning-rate",
        "0.05",
        "--num-workers",
        "0",
    ]
    assert cli.main([*run, "--output-dir", str(tmp_path / "straight")]) == 0

    interrupted = tmp_path / "interrupted"
    assert cli.main([*run, "--output-dir", str(interrupted)], callbacks=[InterruptAfterSave(4)]) == 130
    assert "with --resume to continue" in capsys.readouterr().err
    assert (interrupted / "checkpoints" / "trial-1" / "checkpoint-4").is_dir()
    assert not (interrupted / "model.safetensors").exists()
    assert cli.main([*run, "--output-dir", str(interrupted)]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert cli.main([*run, "--output-dir", str(interrupted), "--max-steps", "8", "--resume"]) == 2
    assert "steps (was 6, now 8)" in capsys.readouterr().err

    assert cli.main([*run, "--output-dir", str(interrupted), "--resume"]) == 0
    assert "Resuming from" in capsys.readouterr().out
    resumed, straight = (
        load_file(interrupted / "model.safetensors"),
        load_file(tmp_path / "straight" / "model.safetensors"),
    )
    assert resumed["classifier.1.weight"].abs().sum() > 0  # it trained
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)
    assert not (interrupted / "checkpoints").exists()
    steps = [entry["step"] for entry in json.loads((interrupted / "training_log.json").read_text())["log_history"]]
    assert steps[-1] == 6


class InterruptInTrial(TrainerCallback):
    """Stops the process after the checkpoint at `step` of the `trial`-th training (numbered from 1)."""

    def __init__(self, trial: int, step: int):
        self.trial, self.step, self.started = trial, step, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started += 1

    def on_save(self, args, state, control, **kwargs):
        if self.started == self.trial and state.global_step == self.step:
            raise KeyboardInterrupt(f"interrupted in trial {self.trial}")


MARKED_ACCURACY = 0.123456789


def test_resume_reuses_finished_trials_and_overwrite_output_dir_starts_over(tmp_path, tiny_checkpoint):
    folder = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    run = [
        "--model",
        str(tiny_checkpoint),
        "--train-dir",
        str(folder),
        "--num-workers",
        "0",
        "--trials",
        "2",
        "--save-steps",
        "2",
        *SMALL_RUN,
    ]
    interrupted = tmp_path / "interrupted"
    assert cli.main([*run, "--output-dir", str(interrupted)], callbacks=[InterruptInTrial(2, 2)]) == 130
    # Mark trial 1's finished result with an accuracy no run on these few images can reach (not a multiple of
    # 1/n for a small n), to see whether it is reused.
    result_file = interrupted / "checkpoints" / "trial-1" / "result.json"
    result = json.loads(result_file.read_text())
    result["eval_metrics"]["eval_accuracy"] = MARKED_ACCURACY
    result_file.write_text(json.dumps(result))
    copy = tmp_path / "copy"
    shutil.copytree(interrupted, copy)
    assert cli.main([*run, "--output-dir", str(interrupted), "--resume"]) == 0
    assert json.loads((interrupted / "eval_results.json").read_text())["eval_accuracy_trials"][0] == MARKED_ACCURACY
    assert cli.main([*run, "--output-dir", str(copy), "--overwrite-output-dir"]) == 0
    assert MARKED_ACCURACY not in json.loads((copy / "eval_results.json").read_text())["eval_accuracy_trials"]
    assert_complete_folder(copy)


def test_a_finished_folder_is_replaced_only_when_asked_and_atomically(tmp_path, tiny_checkpoint, capsys):
    # An upstream checkpoint pretrained multi-label (pretraining --multi-label) says so in its config.
    upstream = tmp_path / "multi-label-upstream"
    shutil.copytree(tiny_checkpoint, upstream)
    config = json.loads((upstream / "config.json").read_text())
    (upstream / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    # Single-label images in a folder below a hidden one (e.g. ~/.cache/...).
    folder = write_image_folder(tmp_path / ".cache" / "data" / "train", {"a": 10, "b": 10})
    output = tmp_path / "out"
    common = [
        "--train-dir",
        str(folder),
        "--output-dir",
        str(output),
        "--validation-fraction",
        "0.34",
        "--num-workers",
        "0",
        *SMALL_RUN,
    ]
    few_shot = ["--model", str(upstream), *common, "--trials", "2", "--no-crop"]
    assert cli.main(few_shot) == 0
    printed = capsys.readouterr().out
    assert "Trial 1 of 2 (seed 0)" in printed and "Trial 2 of 2: accuracy" in printed
    assert "resize 32, no random crop (override)" in printed and "random horizontal flip" in printed
    assert json.loads((output / "config.json").read_text())["problem_type"] == "single_label_classification"
    card = (output / "README.md").read_text()  # written in the staging folder, for the folder's final name
    assert 'model="out"' in card and ".partial" not in card
    hyperrule = json.loads((output / "bit_hyperrule.json").read_text())
    assert set(hyperrule) >= HYPERRULE_KEYS
    assert (hyperrule["random_crop"], hyperrule["horizontal_flip"]) == (False, True)
    assert "random_crop" in hyperrule["overrides"]
    # Two trials: eval_accuracy is their median (the mean of both); the folder holds the lower one's model.
    eval_results = json.loads((output / "eval_results.json").read_text())
    accuracies = eval_results["eval_accuracy_trials"]
    saved = json.loads((output / "all_results.json").read_text())["saved_trial"]
    assert eval_results["eval_accuracy"] == pytest.approx(statistics.median(accuracies))
    assert eval_results["eval_accuracy_saved_trial"] == accuracies[saved - 1] == min(accuracies)
    assert f"Saved the model of trial {saved} of 2: accuracy {min(accuracies):.4f}, the lower of the two" in printed
    held_out = load_image_folders(folder, validation_fraction=0.34).eval
    model = BitForImageClassification.from_pretrained(output).eval()
    with torch.no_grad():
        pixels = torch.stack([DecodedImages(held_out, 32)[i]["pixel_values"] for i in range(len(held_out))])
        predicted = model(pixels).logits.argmax(-1)
    correct = (predicted == torch.as_tensor(held_out["label"])).float().mean().item()
    assert correct == pytest.approx(accuracies[saved - 1])  # the saved weights are the saved trial's

    # A second run into the finished folder is refused, and leaves it as it was.
    finished = (output / "model.safetensors").read_bytes()
    assert cli.main(few_shot) == 2
    assert "already holds a fine-tuned model" in capsys.readouterr().err
    assert (output / "model.safetensors").read_bytes() == finished and not (output / "checkpoints").exists()
    # A failing assembly (here: no trained weights to copy) leaves the finished folder untouched.
    rule = BitHyperRule.from_dataset(10, 64)
    with pytest.raises(FileNotFoundError):
        write_output_folder(
            output, tmp_path / "no-model", rule, eval_results={}, all_results={}, finetune_args={}, log_history=[]
        )
    assert (output / "model.safetensors").read_bytes() == finished
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".out")) == []

    # --overwrite-output-dir replaces it; from random weights, seeded: the same run twice gives the same model.
    scratch = ["--model", "bit-tiny", "--from-scratch", *common, "--overwrite-output-dir"]
    weights = []
    for _ in range(2):
        assert cli.main(scratch) == 0
        weights.append(load_file(output / "model.safetensors"))
        assert json.loads((output / "bit_finetune_args.json").read_text())["from_scratch"] is True
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert_complete_folder(output)


# --- End to end on real photographs, stock pipeline, push to the Hub -----------------------------------


class _RecordingHub(http.server.BaseHTTPRequestHandler):
    """A loopback stand-in for the Hub API: no such repository yet, accepts its creation, refuses the upload."""

    requests: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append((self.path, self.headers.get("Authorization"), body))
        if self.command == "GET" and self.path.startswith("/api/models/someone/bit-hymenoptera"):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/api/repos/create":
            payload = json.dumps({"url": f"http://{self.headers['Host']}/someone/bit-hymenoptera"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        else:
            self.send_error(400, "upload refused by the test server")

    do_GET = do_PUT = do_POST

    def log_message(self, *args):
        """No per-request log lines: they would clutter pytest's output."""


def test_fine_tune_hymenoptera_then_stock_pipeline_and_push(
    tmp_path, hymenoptera_dir, tiny_checkpoint, ant_image_path
):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    output = tmp_path / "bit-hymenoptera"
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
        "HF_TOKEN": "hf_test_token",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("HF_HUB_OFFLINE", None)
    command = [
        sys.executable,
        "-m",
        "finetune",
        "--model",
        str(tiny_checkpoint),
        "--train-dir",
        str(hymenoptera_dir / "train"),
        "--validation-dir",
        str(hymenoptera_dir / "val"),
        "--output-dir",
        str(output),
        "--push-to-hub",
        "--hub-model-id",
        "someone/bit-hymenoptera",
        "--num-workers",
        "2",
        *SMALL_RUN,
    ]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    finally:
        server.shutdown()
    # Saved locally, then the upload failed with a clear message (exit status 3), never a traceback.
    assert completed.returncode == 3, completed.stderr[-3000:]
    assert f"The fine-tuned model is saved in {output}" in completed.stderr
    assert "someone/bit-hymenoptera" in completed.stderr and "Traceback" not in completed.stderr
    create = [request for request in _RecordingHub.requests if request[0] == "/api/repos/create"]
    assert create and create[0][1] == "Bearer hf_test_token" and b"bit-hymenoptera" in create[0][2]

    assert_complete_folder(output)
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "ants", "1": "bees"}
    assert json.loads((output / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}
    hyperrule = json.loads((output / "bit_hyperrule.json").read_text())
    assert set(hyperrule) >= HYPERRULE_KEYS and hyperrule["dataset_size"] == 245
    assert (hyperrule["precrop"], hyperrule["crop"], hyperrule["steps"]) == (40, 32, 4)
    assert hyperrule["median_image_area"] >= 96 * 96  # photographs: the rule alone would pick 448/384
    eval_results = json.loads((output / "eval_results.json").read_text())
    assert 0 <= eval_results["eval_accuracy"] <= 1 and eval_results["eval_samples"] == 153
    assert json.loads((output / "all_results.json").read_text())["eval_accuracy"] == eval_results["eval_accuracy"]
    args = json.loads((output / "bit_finetune_args.json").read_text())
    assert args["command"][:3] == ["bit-finetune", "--model", str(tiny_checkpoint)]
    assert args["dataset"] == {
        "train_dir": str(hymenoptera_dir / "train"),
        "validation_dir": str(hymenoptera_dir / "val"),
        "num_train_examples": 245,
        "num_eval_examples": 153,
        "num_classes": 2,
        "examples_per_class": None,
        "trials": 1,
    }
    history = json.loads((output / "training_log.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]

    model = BitForImageClassification.from_pretrained(output).eval()
    with torch.no_grad():
        pixel_values = bit_image_processor(32)(Image.open(ant_image_path), return_tensors="pt")["pixel_values"]
        ours = model(pixel_values).logits.softmax(-1)[0].tolist()
    stock = run_clean_python(
        f"""
        from transformers import pipeline
        classify = pipeline("image-classification", model={str(output)!r})
        result = {{item["label"]: item["score"] for item in classify({str(ant_image_path)!r})}}
        """
    )
    assert stock == pytest.approx({"ants": ours[0], "bees": ours[1]}, abs=1e-5)


def test_offline_push_fails_clearly_after_the_local_save(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code = (
        "from finetune.output_folder import push_to_hub, HubUploadError\n"
        f"try:\n    push_to_hub({str(tmp_path / 'model')!r}, 'someone/model')\n"
        "except HubUploadError as error:\n    print('CLEAR:', error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert f"CLEAR: The fine-tuned model is saved in {tmp_path / 'model'}" in completed.stdout, completed.stderr
    assert "hf upload someone/model" in completed.stdout


# --- The main job ------------------------------------------------------------------------------------


def test_main_job_prints_transfer_vs_scratch_and_saves_the_full_set_model(tmp_path, capsys):
    from pretraining import embedded_checkpoint_path

    output = tmp_path / "digits"
    threads = torch.get_num_threads()
    status = cli.main(["--max-steps", "2", "--trials", "2", "--output-dir", str(output)])
    assert status == 0
    printed = capsys.readouterr().out
    assert f"fine-tuning of {embedded_checkpoint_path()} on scikit-learn's digits" in printed
    resolution = json.loads((embedded_checkpoint_path() / "preprocessor_config.json").read_text())["size"]["height"]
    assert "CPU-sized override of BiT-HyperRule" in printed and "steps 500 -> 2" in printed
    assert f"crop 128 -> {resolution}" in printed  # the checkpoint's own resolution
    assert "learning rate 0.003: the rule's, not scaled to the batch" in printed
    assert "| examples per class | transfer (embedded checkpoint) | from scratch |" in printed
    assert "New zero-initialised head" not in printed  # expected in every transfer run: not repeated 16 times
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "%" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "5", "10", "all (1,198)"]
    # Few-shot rows: median (min-max) over the trials for both arms; the full set: one run each.
    assert all(len(re.findall(r"\d+\.\d% \(\d+\.\d-\d+\.\d\)", row)) == 2 for row in rows[:3])
    assert len(re.findall(r"\d+\.\d%", rows[3])) == 2 and "(" not in rows[3].split("|", 2)[2]
    assert_complete_folder(output)
    assert json.loads((output / "config.json").read_text())["id2label"]["7"] == "7"
    hyperrule = json.loads((output / "bit_hyperrule.json").read_text())
    assert (
        hyperrule["crop"] == resolution and hyperrule["micro_batch_size"] == 64 and hyperrule["dataset_size"] == 1198
    )
    assert torch.get_num_threads() == threads  # the job's one intra-op thread is not left behind
    for unused in (
        ["--examples-per-class", "3"],
        ["--save-steps", "5"],
        ["--bit-l-resolution"],
        ["--validation-fraction", "0.2"],
        ["--image-column", "img"],
    ):
        with pytest.raises(FinetuneInputError, match=f"{unused[0]}: not used by the main job"):
            cli.main_job_settings(cli.parse_arguments(unused), [])
    with pytest.raises(FinetuneInputError, match="already holds a fine-tuned model.*--overwrite-output-dir"):
        run_main_job(cli.main_job_settings(cli.parse_arguments(["--output-dir", str(output)]), []))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--paper-rule"], "--paper-rule belongs to the main job"),
        (["--image-column", "img"], "--image-column go(es) with --dataset"),
        (["--validation-dir", "v", "--validation-fraction", "0.2"], "with --validation-dir nothing is held out"),
        (["--resume", "--overwrite-output-dir"], "give one"),
    ],
)
def test_flags_a_run_would_ignore_are_refused(flags, message):
    arguments = cli.parse_arguments(["--model", "m", "--train-dir", "d", "--output-dir", "o", *flags])
    with pytest.raises(FinetuneInputError, match=re.escape(message)):
        cli.check_arguments(arguments)
