"""Random search (bit-finetune --search): the regularisers are exact, dropout leaves folders stock-loadable, the
search runs through Trainer.hyperparameter_search, resumes after a kill and runs in parallel processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, randomize_, run_clean_python
from huggingface_hub import ModelCard
from PIL import Image

from finetune import cli
from finetune.preprocessing import HyperRuleTrainingStream, ImageBatchCollator, PreprocessedImages
from finetune.regularizers import InitialWeightDecay, PreLogitsDropout
from finetune.search import STORAGE_FILE, STUDY_NAME, SearchSpace, _sampler, expected_best_curve, hp_space
from finetune.trainer import BitTrainer, BitTrainingArguments
from model_cards import write_model_card
from modeling_bit import BitConfig, BitForImageClassification

optuna = pytest.importorskip("optuna")


def tiny_model(seed: int = 0, labels: int = 3) -> BitForImageClassification:
    torch.manual_seed(seed)
    return randomize_(BitForImageClassification(BitConfig.from_preset("bit-tiny", num_labels=labels)), seed)


def tiny_images(count: int = 16, size: int = 32, labels: int = 3, seed: int = 0) -> PreprocessedImages:
    generator = torch.Generator().manual_seed(seed)
    return PreprocessedImages(
        torch.rand(count, 3, size, size, generator=generator) * 2 - 1, torch.arange(count) % labels, []
    )


def test_decay_toward_initial_weights_gradient_is_the_hand_computed_one():
    model = tiny_model()
    decay = InitialWeightDecay(model, 0.3)
    initial = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model(torch.randn(2, 3, 32, 32)).logits.square().sum().backward()
    data_gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    decay.add_to_gradients()
    for name, parameter in model.named_parameters():
        by_hand = data_gradients[name] + 0.3 * (parameter.detach() - initial[name])
        torch.testing.assert_close(parameter.grad, by_hand, rtol=0, atol=1e-6)
    # ... which is the gradient of the penalty (0.3 / 2) ||w - w0||^2.
    model.zero_grad()
    decay.penalty().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, 0.3 * (parameter.detach() - initial[name]), rtol=0, atol=1e-6)


def train_with_trainer(decay: float, tmp_path: Path) -> dict:
    images = tiny_images()
    stream = HyperRuleTrainingStream(images, 3 * 8, crop=32, seed=0, flip=False, random_crop=False)
    args = BitTrainingArguments(
        output_dir=str(tmp_path / f"run-{decay}"),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        optim="sgd",
        optim_args="momentum=0.9",
        weight_decay=0.0,
        max_grad_norm=0.0,
        decay_to_initial_weights=decay,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = BitTrainer(tiny_model(), args, train_dataset=stream, data_collator=ImageBatchCollator(32))
    trainer.train()
    return {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}, stream


def hand_written_sgd(stream, decay: float) -> dict:
    """3 SGD steps (momentum 0.9, lr 0.05) of 2 micro-batches of 4, the decay's gradient added by hand."""
    model = tiny_model()
    initial = [parameter.detach().clone() for parameter in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        optimizer.zero_grad()
        for micro in range(2):
            batch = [stream[8 * step + 4 * micro + offset] for offset in range(4)]
            pixels = torch.stack([example["pixel_values"] for example in batch])
            labels = torch.stack([torch.as_tensor(example["labels"]) for example in batch])
            (F.cross_entropy(model(pixels).logits, labels) / 2).backward()
        with torch.no_grad():
            for parameter, start in zip(model.parameters(), initial):
                parameter.grad += decay * (parameter - start)
        optimizer.step()
    return {name: parameter.detach() for name, parameter in model.named_parameters()}


def test_trainer_with_decay_toward_initial_weights_equals_a_hand_written_sgd_loop(tmp_path):
    trained, stream = train_with_trainer(0.2, tmp_path)
    by_hand = hand_written_sgd(stream, 0.2)
    for name, parameter in by_hand.items():
        torch.testing.assert_close(trained[name], parameter, rtol=1e-5, atol=1e-6)
    without = hand_written_sgd(stream, 0.0)
    assert max((trained[name] - without[name]).abs().max() for name in trained) > 1e-4  # the decay did act


def test_pre_logits_dropout_only_in_training_and_the_folder_loads_in_stock_transformers(tmp_path):
    model = tiny_model()
    pixels = torch.randn(64, 3, 32, 32)
    model.eval()
    reference = model(pixels).logits
    dropout = PreLogitsDropout(model, 0.5)
    seen = []  # what the classifier's linear layer receives (hooks run in the order they were registered)
    model.classifier.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    torch.testing.assert_close(model(pixels).logits, reference)  # eval: unaffected
    torch.testing.assert_close(seen[-1], model.bit(pixels).pooler_output)
    model.train()
    model(pixels)
    plain = model.bit(pixels).pooler_output.flatten(1)
    dropped = seen[-1].flatten(1)
    active = plain != 0
    kept = dropped != 0
    assert 0.4 < (kept & active).sum() / active.sum() < 0.6  # half the active pre-logits dropped ...
    torch.testing.assert_close(dropped[kept], 2 * plain[kept], rtol=1e-4, atol=1e-5)  # ... the others scaled by 2
    dropout.remove()
    model.train(False)

    # A model trained with dropout saves a plain BiT folder: stock transformers gives the same logits.
    images = tiny_images(8)
    args = BitTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        optim="sgd",
        pre_logits_dropout=0.6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    stream = HyperRuleTrainingStream(images, 8, crop=32, seed=0, random_crop=False)
    trainer = BitTrainer(tiny_model(1), args, train_dataset=stream, data_collator=ImageBatchCollator(32))
    trainer.train()
    assert trainer._pre_logits_dropout.rate == 0.6
    trainer.save_model(str(tmp_path / "folder"))
    probe = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        ours = trainer.model.eval()(probe.to(trainer.model.device)).logits.cpu()
    stock = run_clean_python(
        f"""
        import torch
        from transformers import BitForImageClassification
        model = BitForImageClassification.from_pretrained({str(tmp_path / "folder")!r}).eval()
        probe = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
        with torch.no_grad():
            result = model(probe).logits.tolist()
        """
    )
    np.testing.assert_allclose(np.asarray(stock), ours.numpy(), rtol=1e-4, atol=1e-5)


def test_expected_best_curve_is_fig6s_average_over_orderings():
    accuracies = [0.5, 0.9, 0.7, 0.6]
    curve = expected_best_curve(accuracies, orderings=100, seed=0)
    means = [point["expected_best_eval_accuracy"] for point in curve]
    assert means[-1] == pytest.approx(0.9) and curve[-1]["standard_error"] == pytest.approx(0.0)
    assert all(a <= b + 1e-12 for a, b in zip(means, means[1:]))
    assert abs(means[0] - np.mean(accuracies)) < 4 * curve[0]["standard_error"]
    # Two trials: exactly E[max of a random pair] = (0.9*3 + 0.7*2 + 0.6*1) / 6 over all orderings.
    assert abs(means[1] - (0.9 * 3 + 0.7 * 2 + 0.6) / 6) < 4 * curve[1]["standard_error"] + 1e-9


def write_folder(root: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label, channel in (("red", 0), ("green", 1), ("blue", 2)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = np.zeros((36, 36, 3), np.uint8)
            pixels[..., channel] = 170
            Image.fromarray(pixels + rng.integers(0, 70, pixels.shape, dtype=np.uint8)).save(
                root / label / f"{index}.png"
            )
    return root


SEARCH_FLAGS = [
    "--search-steps",
    "2",
    "3",
    "--search-resolutions",
    "32",
    "--max-steps",
    "2",
    "--batch-size",
    "6",
    "--resolution",
    "40",
    "32",
    "--num-workers",
    "0",
]


def completed_trials(output: Path) -> list:
    storage = output / "checkpoints" / STORAGE_FILE
    if not storage.is_file():
        return []
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{storage}")
    except Exception:  # the study is being created
        return []
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_search_runs_resumes_after_a_kill_and_runs_in_parallel(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = write_folder(tmp_path / "train", 8, 0)
    test = write_folder(tmp_path / "test", 3, 1)
    checkpoint = tmp_path / "upstream"
    tiny_model(labels=5).save_pretrained(checkpoint)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "finetune", "--model", str(checkpoint), "--train-dir", str(train)]
    command += ["--validation-dir", str(test), "--output-dir", str(output), "--search", "4", *SEARCH_FLAGS]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, "--search-processes", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not completed_trials(output) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the parent and both worker processes
    process.wait()
    before = {trial.number: trial.datetime_complete for trial in completed_trials(output)}
    assert 1 <= len(before) < 4, process.stderr.read().decode()[-2000:]
    assert not (output / "search_results.json").exists()

    # Without --resume the unfinished search is not touched; with it, it continues (here in this process).
    assert cli.main(command[3:]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main([*command[3:], "--resume"]) == 0
    printed = capsys.readouterr()
    # The test accuracy is reported by the search, as a number; no Trainer metrics dict with quoted numbers.
    assert "Best of 4 trials" in printed.out + printed.err
    assert "'eval_accuracy': '" not in printed.out + printed.err
    results = json.loads((output / "search_results.json").read_text())
    assert len(results["trials"]) == 4
    numbers = {trial["number"] for trial in results["trials"]}
    assert set(before) <= numbers  # the finished trials were kept (a rerun would have a new number) ...
    # ... and every trial's settings are the draw of its number (a rerun: the interrupted trial's draw).
    study = optuna.create_study(sampler=_sampler(0))
    space = hp_space(SearchSpace(steps=(2, 3), resolution=(32,)))
    expected = []
    for _ in range(max(numbers) + 1):
        trial = study.ask()
        expected.append(space(trial))
        study.tell(trial, 0.0)
    for trial in results["trials"]:
        assert trial["settings"] in expected
    best = max(results["trials"], key=lambda trial: (trial["eval_accuracy"], -trial["number"]))
    assert results["best_trial"] == best["number"]
    assert 0 <= results["test_accuracy"] <= 1 and results["test"]["examples"] == 9
    assert set(results["hyperrule"]) >= {"eval_accuracy", "test_accuracy"}
    assert [point["trials"] for point in results["expected_best_curve"]] == [1, 2, 3, 4]
    # The folder is the chosen trial's fine-tuned model, with its card section and Fig. 6's plot.
    card = (output / "README.md").read_text()
    assert "## Hyper-parameter search" in card and "search_curve.png" in card
    assert f"{best['number']} (chosen)" in card
    assert (output / "search_curve.png").is_file() and not (output / "checkpoints").exists()
    # The card is rendered from the folder's records, so rendering it again (as for the Hub) keeps the section;
    # what it reports as the evaluation is the test accuracy, not the validation accuracy the trial was chosen on.
    (output / "README.md").unlink()
    write_model_card(output)
    assert (output / "README.md").read_text() == card
    metric = ModelCard.load(output / "README.md").data.eval_results[0]
    assert metric.metric_value == pytest.approx(results["test_accuracy"]) and metric.dataset_type == "imagefolder"
    recorded = json.loads((output / "bit_hyperrule.json").read_text())
    assert recorded["steps"] == best["settings"]["steps"] and recorded["crop"] == best["settings"]["resolution"]
    assert recorded["learning_rate"] == pytest.approx(best["settings"]["learning_rate"])
    model = BitForImageClassification.from_pretrained(output)
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--search", "0"], "expected at least 1 trial"),
        (["--search", "2", "--examples-per-class", "2"], "drop --examples-per-class"),
        (["--search", "2", "--search-resolutions", "16"], "at least 32 pixels"),
        (["--search", "2", "--pre-logits-dropout", "0.2"], "draws the dropout"),
    ],
)
def test_bad_search_input_is_refused_before_anything_is_written(flags, message, tmp_path, capsys):
    train = write_folder(tmp_path / "train", 8, 0)
    output = tmp_path / "out"
    status = cli.main(
        ["--model", "bit-tiny", "--from-scratch", "--train-dir", str(train), "--output-dir", str(output), *flags]
    )
    assert status == 2
    assert message in capsys.readouterr().err
    assert not output.exists()
