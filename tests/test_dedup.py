"""bit-dedup: exact search, planted near-duplicates of real photos, the cache, Table 6 and --exclude-duplicates."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image

from dedup import calibration, cli, features
from dedup.errors import DedupInputError
from dedup.search import ExactCosineSearch, FaissSearch
from dedup.sources import FolderSource
from finetune import cli as finetune_cli
from finetune.data import load_image_folders
from finetune.duplicates import evaluate_deduplicated, read_duplicates
from finetune.models import load_model_for_labels
from modeling_bit import BitConfig, BitForImageClassification, bit_image_processor
from pretraining import embedded_checkpoint_path

# With the default views (the whole image and its central 80%); an off-centre crop is not caught (README).
CATCHABLE = ("resized", "recompressed", "cropped", "flipped", "colour-shifted")


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_chunked_search_equals_the_full_similarity_matrix():
    queries, keys = unit_rows(37, 16, 0), unit_rows(1000, 16, 1)
    keys[123] = queries[5]  # an exact duplicate, and a near one
    keys[900] = queries[7] + 0.05 * keys[900]
    keys[900] /= np.linalg.norm(keys[900])
    threshold, k = 0.6, 4
    full = queries @ keys.T
    expected_top = np.argsort(-full, axis=1, kind="stable")[:, :k]
    expected_pairs = {(int(i), int(j)) for i, j in zip(*np.nonzero(full >= threshold))}
    searches = [ExactCosineSearch(queries, k=k, threshold=threshold, memory_bytes=4 * 37 * 50)]  # 50-row tiles
    with contextlib.suppress(DedupInputError):  # faiss is optional (pip install faiss-cpu)
        searches.append(FaissSearch(queries, k=k, threshold=threshold))
    for search in searches:
        for start, stop in ((0, 333), (333, 334), (334, 1000)):  # uneven upstream chunks
            search.add(keys[start:stop])
        result = search.result()
        np.testing.assert_array_equal(result.indices, expected_top)
        np.testing.assert_allclose(result.similarities, np.take_along_axis(full, expected_top, 1), atol=1e-5)
        assert {(i, j) for i, j, _ in result.pairs} == expected_pairs
        assert (5, 123) in expected_pairs and (7, 900) in expected_pairs


def test_search_over_views_takes_each_pair_of_items_at_its_best_views():
    queries = unit_rows(30 * 2, 16, 2).reshape(30, 2, 16)
    keys = unit_rows(400 * 3, 16, 3).reshape(400, 3, 16)
    keys[17, 2] = queries[4, 1]  # a crop view of upstream item 17 is query 4's crop view
    keys[250, 0] = queries[9, 1]  # upstream item 250, whole, is query 9's crop view
    best = np.einsum("ivd,jwd->ijvw", queries, keys).max(axis=(2, 3))  # the definition, by brute force
    threshold, k = 0.7, 5
    expected_top = np.argsort(-best, axis=1, kind="stable")[:, :k]
    expected_pairs = {(int(i), int(j)) for i, j in zip(*np.nonzero(best >= threshold))}
    assert {(4, 17), (9, 250)} <= expected_pairs
    searches = [ExactCosineSearch(queries, k=k, threshold=threshold, memory_bytes=4 * 6 * 60 * 7)]
    with contextlib.suppress(DedupInputError):  # faiss is optional (pip install faiss-cpu)
        searches.append(FaissSearch(queries, k=k, threshold=threshold))
    for search in searches:
        for start, stop in ((0, 101), (101, 102), (102, 400)):
            search.add(keys[start:stop])
        result = search.result()
        np.testing.assert_array_equal(result.indices, expected_top)
        np.testing.assert_allclose(result.similarities, np.take_along_axis(best, expected_top, 1), atol=1e-5)
        assert {(i, j) for i, j, _ in result.pairs} == expected_pairs
        for i, j, value in result.pairs:
            assert value == pytest.approx(best[i, j], abs=1e-5)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, hymenoptera_dir) -> dict:
    """Upstream: 60 distinct training photos, 6 planted copies of each kind of 30 validation photos, one unreadable
    file. Downstream: those 30 validation photos, 30 other ones, one unreadable file."""
    root = tmp_path_factory.mktemp("planted")
    up, down = root / "upstream", root / "downstream"
    train = sorted((hymenoptera_dir / "train").glob("*/*.jpg"))[::4][:60]
    val = sorted((hymenoptera_dir / "val").glob("*/*.jpg"))[::2][:60]
    for path in train:
        (up / "distinct").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, up / "distinct" / path.name)
    expected = {}
    kinds = list(calibration.NEAR_DUPLICATE_KINDS.items())
    for index, path in enumerate(val):
        target = down / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        if index < 30:
            kind, plant = kinds[index % len(kinds)]
            copy = plant(Image.open(path).convert("RGB"))
            (up / kind).mkdir(parents=True, exist_ok=True)
            copy.save(up / kind / f"{path.stem}.png")
            expected[f"{path.parent.name}/{path.name}"] = (kind, f"{kind}/{path.stem}.png")
    (up / "broken.jpg").write_bytes(b"not an image")
    (down / "ants" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return {"upstream": up, "downstream": down, "expected": expected, "cache": root / "cache"}


def run_dedup(planted, output: Path, *extra) -> int:
    return cli.main(
        [
            "--upstream-dir",
            str(planted["upstream"]),
            "--downstream-dir",
            str(planted["downstream"]),
            "--output-dir",
            str(output),
            "--model",
            str(embedded_checkpoint_path()),
            "--cache-dir",
            str(planted["cache"]),
            "--num-workers",
            "2",
            *extra,
        ]
    )


def test_planted_near_duplicates_of_real_photos_are_found(planted, tmp_path):
    assert run_dedup(planted, tmp_path / "out") == 0
    record = read_duplicates(tmp_path / "out" / "duplicates.json")
    details = record.details
    found = {(pair.downstream, pair.upstream) for pair in record.pairs}
    by_kind = {kind: [] for kind in calibration.NEAR_DUPLICATE_KINDS}
    for downstream, (kind, upstream) in planted["expected"].items():
        by_kind[kind].append((downstream, upstream) in found)
    caught = [hit for kind in CATCHABLE for hit in by_kind[kind]]
    assert np.mean(caught) >= 0.95, by_kind
    # False positives: pairs that are not planted, among all distinct (downstream, upstream) pairs.
    planted_pairs = {(down, up) for down, (_, up) in planted["expected"].items()}
    false = found - planted_pairs
    distinct_pairs = details["downstream"]["images"] * details["upstream"]["images"] - len(planted_pairs)
    assert len(false) / distinct_pairs <= 0.01
    assert details["threshold_source"] == "calibrated"
    assert set(details["calibration"]["recall"]) == set(calibration.NEAR_DUPLICATE_KINDS)
    assert record.threshold == details["calibration"]["threshold"]
    assert all(pair.similarity >= record.threshold for pair in record.pairs)
    assert details["unreadable_images"] == {"downstream": ["ants/broken.jpg"], "upstream": ["broken.jpg"]}
    assert (details["downstream"]["images"], details["upstream"]["images"]) == (60, 90)
    neighbours = json.loads((tmp_path / "out" / "neighbours.json").read_text())["neighbours"]
    assert len(neighbours) == 60 and all(len(item["nearest"]) == 5 for item in neighbours)
    nearest = {item["downstream"]: item["nearest"][0]["upstream"] for item in neighbours}
    assert all(nearest[down] == up for down, (kind, up) in planted["expected"].items() if kind in CATCHABLE)
    with Image.open(tmp_path / "out" / "duplicates.png") as picture:
        assert picture.width > 0

    # Second run: the features come from the cache (no image decoded); a given threshold is used as is.
    cached = sorted(path.stat().st_mtime_ns for path in planted["cache"].rglob("shard-*.npz"))
    assert run_dedup(planted, tmp_path / "again", "--threshold", "0.99", "--no-picture") == 0
    assert sorted(path.stat().st_mtime_ns for path in planted["cache"].rglob("shard-*.npz")) == cached
    again = read_duplicates(tmp_path / "again" / "duplicates.json")
    assert again.threshold == 0.99 and again.details["threshold_source"] == "given"
    assert {(p.downstream, p.upstream) for p in again.pairs} == {
        (p.downstream, p.upstream) for p in record.pairs if p.similarity >= 0.99
    }
    assert not (tmp_path / "again" / "duplicates.png").exists()


def test_an_interrupted_feature_pass_continues_after_its_last_shard(tmp_path, hymenoptera_dir, monkeypatch):
    monkeypatch.setattr(features, "SHARD_SIZE", 4)
    folder = tmp_path / "images"
    for path in sorted((hymenoptera_dir / "val" / "bees").glob("*.jpg"))[:10]:
        folder.mkdir(exist_ok=True)
        shutil.copy(path, folder / path.name)
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    randomize_(BitForImageClassification(BitConfig.from_preset("bit-tiny"))).save_pretrained(model_dir)
    bit_image_processor(32).save_pretrained(model_dir)
    model = features.load_feature_model(str(model_dir), device="cpu")
    source = FolderSource(folder, "--downstream-dir")

    def compute(cache):
        shards = list(features.source_features(model, source, cache_dir=cache))
        return np.concatenate([shard.features for shard in shards]), [n for shard in shards for n in shard.names]

    full, names = compute(tmp_path / "full")
    assert full.shape == (10, 2, 256) and np.allclose(np.linalg.norm(full, axis=-1), 1, atol=1e-5)  # whole, crop
    cache = tmp_path / "partial"
    shutil.copytree(tmp_path / "full", cache)
    (shard_folder,) = cache.iterdir()
    (shard_folder / features.COMPLETE_FILE).unlink()
    (shard_folder / "shard-000002.npz").unlink()
    (shard_folder / "shard-000001.npz").unlink()
    first = (shard_folder / "shard-000000.npz").stat().st_mtime_ns
    resumed, resumed_names = compute(cache)
    assert (shard_folder / "shard-000000.npz").stat().st_mtime_ns == first  # kept, not recomputed
    np.testing.assert_allclose(resumed, full, atol=1e-6)
    assert resumed_names == names == source.files
    # Flip invariance: a mirrored image has the same feature; its central crop is the crop view.
    image = Image.open(folder / names[0]).convert("RGB")
    mirrored = model.features_of_images([image, image.transpose(Image.FLIP_LEFT_RIGHT)])
    np.testing.assert_allclose(mirrored[0, 0], mirrored[1, 0], atol=1e-5)
    cropped = model.features_of_images([features.crop_window(image, 0.8)])
    np.testing.assert_allclose(cropped[0, 0], mirrored[0, 1], atol=1e-6)
    np.testing.assert_allclose(full[0], mirrored[0], atol=1e-5)  # decoded in the pass as in memory


def test_table6_and_bit_finetune_exclude_duplicates(planted, tmp_path, capsys):
    """Table 6 equals a hand count over the model's predictions; bit-finetune reports the same row."""
    assert run_dedup(planted, tmp_path / "dups", "--threshold", "0.99", "--no-picture") == 0
    duplicates = tmp_path / "dups" / "duplicates.json"
    record = read_duplicates(duplicates)
    assert record.pairs
    output = tmp_path / "finetuned"
    status = finetune_cli.main(
        [
            "--model",
            str(embedded_checkpoint_path()),
            "--train-dir",
            str(planted["downstream"]),
            "--validation-dir",
            str(planted["downstream"]),
            "--output-dir",
            str(output),
            "--exclude-duplicates",
            str(duplicates),
            *("--max-steps", "3", "--batch-size", "8", "--resolution", "56", "48", "--num-workers", "0"),
        ]
    )
    assert status == 0
    results = json.loads((output / "all_results.json").read_text())
    assert results["eval_accuracy_full"] == pytest.approx(results["eval_accuracy"])
    removed_names = {pair.downstream for pair in record.pairs}
    assert results["eval_duplicates_removed"] == len(removed_names)
    assert "| test set | Full | Dedup | Dups |" in capsys.readouterr().out

    # By hand: the saved model's predictions on every readable image, with and without the duplicates.
    model = BitForImageClassification.from_pretrained(output).eval()
    processor = bit_image_processor(48)
    correct = {}
    for path in sorted(planted["downstream"].glob("*/*.jpg")):
        try:
            image = Image.open(path).convert("RGB")
        except OSError:
            continue
        with torch.no_grad():
            logits = model(**processor(image, return_tensors="pt")).logits
        correct[f"{path.parent.name}/{path.name}"] = model.config.id2label[int(logits.argmax())] == path.parent.name
    kept = [value for name, value in correct.items() if name not in removed_names]
    assert results["eval_accuracy_full"] == pytest.approx(np.mean(list(correct.values())))
    assert results["eval_accuracy_deduplicated"] == pytest.approx(np.mean(kept))

    # bit-dedup's own Table 6 from the fine-tuned folder: the same numbers.
    assert run_dedup(planted, tmp_path / "table6", "--threshold", "0.99", "--finetuned-model", str(output)) == 0
    row = json.loads((tmp_path / "table6" / "deduplicated_results.json").read_text())
    assert row["full_accuracy"] == pytest.approx(results["eval_accuracy_full"])
    assert row["deduplicated_accuracy"] == pytest.approx(results["eval_accuracy_deduplicated"])
    assert (tmp_path / "table6" / "table6.md").read_text().startswith("| test set | Full | Dedup | Dups |")


def test_a_record_of_another_test_set_is_refused_before_training(planted, tmp_path, capsys, hymenoptera_dir):
    assert run_dedup(planted, tmp_path / "dups", "--threshold", "0.99", "--no-picture") == 0
    model = load_model_for_labels(embedded_checkpoint_path(), ["ants", "bees"], announce=False)
    other = read_duplicates(tmp_path / "dups" / "duplicates.json")
    elsewhere = load_image_folders(hymenoptera_dir / "train", hymenoptera_dir / "train").eval
    with pytest.raises(ValueError, match="was duplicates.json made for this test set"):
        evaluate_deduplicated(model, elsewhere, other, 48)
    output = tmp_path / "never"
    argv = ["--model", str(embedded_checkpoint_path()), "--train-dir", str(hymenoptera_dir / "train")]
    argv += ["--output-dir", str(output), "--exclude-duplicates", str(tmp_path / "dups" / "duplicates.json")]
    assert finetune_cli.main(argv) == 2
    assert "was duplicates.json made for this test set" in capsys.readouterr().err and not output.exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty upstream", "no image files in it"),
        ("not bit", "expected a BiT checkpoint"),
        ("both downstream", "Give one of --downstream-dir"),
        ("bad threshold", "expected a cosine similarity"),
        ("bad crop view", "expected side fractions in (0, 1)"),
        ("both crop flags", "--no-crop-views and --crop-views contradict"),
        ("no output", "--output-dir is required"),
        ("faiss", "faiss"),
    ],
)
def test_bad_input_is_refused_before_any_work(case, message, tmp_path, planted, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    argv = {
        "upstream": str(planted["upstream"]),
        "downstream": str(planted["downstream"]),
        "model": str(embedded_checkpoint_path()),
    }
    extra = []
    if case == "empty upstream":
        argv["upstream"] = str(empty)
    elif case == "not bit":
        argv["model"] = str(foreign)
    elif case == "both downstream":
        extra = ["--downstream-dataset", "x"]
    elif case == "bad threshold":
        extra = ["--threshold", "1.5"]
    elif case == "bad crop view":
        extra = ["--crop-views", "0.8", "1.2"]
    elif case == "both crop flags":
        extra = ["--crop-views", "0.7", "--no-crop-views"]
    elif case == "faiss":
        if importlib.util.find_spec("faiss") is not None:
            pytest.skip("faiss is installed: --faiss is accepted")
        extra = ["--faiss"]
    command = ["--upstream-dir", argv["upstream"], "--downstream-dir", argv["downstream"], "--model", argv["model"]]
    if case != "no output":
        command += ["--output-dir", str(tmp_path / "out")]
    assert cli.main(command + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
