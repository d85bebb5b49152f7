"""bit-finetune as the HF examples' users drive it: Trainer flags, launchers, kills, bad weights, its help.

Real runs of a bit-tiny network on small generated image folders and real photographs; launchers (torchrun)
and kills (SIGKILL) are real processes.
"""

from __future__ import annotations

import http.server
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, run_clean_python, serving
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from finetune import cli
from finetune.checkpoints import checkpoint_problem
from finetune.data import ImageClassificationData
from finetune.engine import FinetuneJob, run_finetuning_jobs
from finetune.hyperrule import BitHyperRule
from finetune.preprocessing import PreprocessedImages

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SMALL_RUN = ["--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "4", "--resolution", "40", "32"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Three learnable classes of small PNGs (colour by class, noise per image)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index, name in enumerate(("a", "b", "c")):
        (root / name).mkdir()
        for item in range(8):
            base = np.zeros((16, 20, 3), np.uint8)
            base[..., index] = 200
            Image.fromarray(base + rng.integers(0, 40, base.shape, dtype=np.uint8)).save(root / name / f"{item}.png")
    return root


def subprocess_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("HF_ENDPOINT", None)
    return env


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(one: dict, other: dict) -> None:
    assert one.keys() == other.keys()
    for name in one:
        torch.testing.assert_close(one[name], other[name], rtol=1e-5, atol=1e-6)


def safetensors_dtypes(path: Path) -> set[str]:
    with open(path, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        header = json.loads(stream.read(length))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


# --- Trainer flags ----------------------------------------------------------------------------------------


class RecordTraining(TrainerCallback):
    """What the Trainer was really given: its arguments, the model's gradient checkpointing, the loader."""

    def __init__(self):
        self.seen = {}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.seen = {
            "bf16": args.bf16,
            "report_to": list(args.report_to),
            "gradient_checkpointing": bool(getattr(model, "is_activation_checkpointing", False)),
            "dataloader_workers": train_dataloader.num_workers,
            "weights_dtype": str(next(model.parameters()).dtype),
        }


def test_precision_checkpointing_and_logging_flags_take_effect_and_save_float32(
    tmp_path, tiny_checkpoint, image_folder, capsys
):
    run = ["--model", str(tiny_checkpoint), "--train-dir", str(image_folder), "--validation-fraction", "0.25"]
    run += [*SMALL_RUN, "--num-workers", "0"]
    folders = {}
    records = {}
    for name, flags in {
        "float32": [],
        "bf16": ["--bf16"],
        "checkpointing": ["--gradient_checkpointing", "--report_to", "none", "--logging_steps", "2"],
        "workers": ["--dataloader-num-workers", "1"],
    }.items():
        record = RecordTraining()
        folders[name] = tmp_path / name
        assert cli.main([*run, *flags, "--output-dir", str(folders[name])], callbacks=[record]) == 0
        records[name] = record.seen
    printed = capsys.readouterr().out
    assert "Measured" in printed and "s per step" in printed and "peak memory" in printed

    assert records["bf16"]["bf16"] and not records["float32"]["bf16"]
    assert records["checkpointing"]["gradient_checkpointing"] and not records["float32"]["gradient_checkpointing"]
    assert records["checkpointing"]["report_to"] == [] and records["workers"]["dataloader_workers"] == 1
    assert records["float32"]["dataloader_workers"] == 0  # in-memory images: crop and flip in the main process
    assert {record["weights_dtype"] for record in records.values()} == {"torch.float32"}  # float32 masters
    # Mixed precision changes the arithmetic; recomputing activations for the backward pass does not.
    float32, bf16, checkpointing = (weights(folders[name]) for name in ("float32", "bf16", "checkpointing"))
    assert any(not torch.allclose(float32[name], bf16[name]) for name in float32)
    assert_same_weights(float32, checkpointing)
    for folder in folders.values():
        assert safetensors_dtypes(folder / "model.safetensors") == {"F32"}
    # --logging-steps 2: loss entries at steps 2 and 4 only (the rule's default logs every step of so short a run),
    # printed as numbers, with the epoch counted over the training set (8 images of 18 per step).
    history = json.loads((folders["checkpointing"] / "training_log.json").read_text())["log_history"]
    losses = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in losses] == [2, 4]
    assert losses[0]["epoch"] == pytest.approx(2 * 8 / 18, abs=1e-3)
    assert re.search(r"'loss': \d+\.\d+, 'grad_norm'", printed) and "'loss': '" not in printed
    default_history = json.loads((folders["float32"] / "training_log.json").read_text())["log_history"]
    assert [entry["step"] for entry in default_history if "loss" in entry] == [1, 2, 3, 4]

    image = sorted((image_folder / "a").glob("*.png"))[0]
    stock = run_clean_python(
        f"""
        from transformers import pipeline
        result = {{}}
        for folder in {[str(folders[name]) for name in ("bf16", "checkpointing")]!r}:
            classify = pipeline("image-classification", model=folder)
            result[folder] = sorted(item["label"] for item in classify({str(image)!r}))
        """
    )
    assert all(labels == ["a", "b", "c"] for labels in stock.values())


def test_trainer_flags_without_effect_are_refused_and_rule_owned_ones_are_overrides(tmp_path, image_folder, capsys):
    base = [
        "--model",
        "bit-tiny",
        "--from-scratch",
        "--train-dir",
        str(image_folder),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    for flags, message in [
        (
            ["--num_train_epochs", "3"],
            "--num-train-epochs: not used by bit-finetune (BiT-HyperRule trains for a number",
        ),
        (["--lr_scheduler_type", "cosine"], "--lr-scheduler-type: not used by bit-finetune"),
        (["--optim", "adamw_torch"], "--optim adamw_torch: BiT-HyperRule fine-tunes with SGD"),
        (["--resume_from_checkpoint", "/some/checkpoint-4"], "bit-finetune resumes its own run"),
        (["--tf32", "true"], "--tf32 requires"),
    ]:
        assert cli.main([*base, *flags]) == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, error
    assert not (tmp_path / "o").exists()
    arguments = cli.parse_arguments([*base, "--learning_rate", "0.01", "--max-steps", "7", "--warmup_steps", "0.5"])
    job = cli.make_job(arguments, [])
    assert job.rule_overrides["learning_rate"] == 0.01 and job.rule_overrides["steps"] == 7
    rule = BitHyperRule.from_dataset(18, 320, **job.rule_overrides)
    assert rule.warmup_steps == 4 and set(rule.overrides) >= {"learning_rate", "steps", "warmup_steps"}


def test_help_reads_as_one_grouped_page_with_dash_spellings():
    completed = subprocess.run(
        [sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    text = completed.stdout
    assert completed.returncode == 0, completed.stderr
    groups = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert groups[1].startswith("BiT-HyperRule") and "Precision and speed:" in groups
    assert "--from-scratch " in text and "[FROM_SCRATCH]" not in text and "--bf16 [BF16]" not in text
    assert "--output_dir" not in text and "--output-dir OUTPUT_DIR" in text
    assert "--micro-batch-size" in text and "--num-workers" in text  # the spellings bit-finetune had
    assert "(default: 42)" not in text and "--seed SEED" in text
    options = [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  --")]
    assert len(options) == len(set(options)) > 100  # every Trainer flag with a use is there, once
    assert "--adam-beta1" not in text and "--num-train-epochs" in text  # refused flags are named, not listed


# --- Resume after a kill ------------------------------------------------------------------------------------


class StopAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _tear(checkpoint: Path, how: str) -> None:
    if how == "empty folder":
        shutil.rmtree(checkpoint)
        checkpoint.mkdir()
    elif how == "weights without trainer_state.json":
        (checkpoint / "trainer_state.json").unlink()
    elif how == "truncated trainer_state.json":
        state = checkpoint / "trainer_state.json"
        state.write_bytes(state.read_bytes()[:40])
    elif how == "truncated optimizer.pt":
        optimizer = checkpoint / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:100])
    elif how == "truncated weights":
        model = checkpoint / "model.safetensors"
        model.write_bytes(model.read_bytes()[:-64])


TEARS = (
    "empty folder",
    "weights without trainer_state.json",
    "truncated trainer_state.json",
    "truncated optimizer.pt",
    "truncated weights",
)

KILLED_WRITER = """
import os, signal, sys, torch
from finetune import cli

write = torch.save

def save_then_die(obj, f, *args, **kwargs):
    # A real SIGKILL in the middle of writing checkpoint-4's optimizer state: half the bytes are on disk.
    if str(f).endswith("checkpoint-4/optimizer.pt"):
        import io
        buffer = io.BytesIO()
        write(obj, buffer, *args, **kwargs)
        with open(f, "wb") as stream:
            stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return write(obj, f, *args, **kwargs)

torch.save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_resume_skips_torn_checkpoints_and_equals_an_uninterrupted_run(
    tmp_path, tiny_checkpoint, image_folder, capsys
):
    run = ["--model", str(tiny_checkpoint), "--train-dir", str(image_folder), "--num-workers", "0"]
    run += ["--max-steps", "6", "--save-steps", "2", "--save-total-limit", "2", "--batch-size", "8"]
    run += ["--micro-batch-size", "4", "--resolution", "40", "32", "--learning-rate", "0.05", "--mixup-alpha", "0.4"]
    assert cli.main([*run, "--output-dir", str(tmp_path / "straight")]) == 0
    straight = weights(tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    assert cli.main([*run, "--output-dir", str(interrupted)], callbacks=[StopAfterSave(4)]) == 130
    trial = interrupted / "checkpoints" / "trial-1"
    assert checkpoint_problem(trial / "checkpoint-2") is None and checkpoint_problem(trial / "checkpoint-4") is None
    capsys.readouterr()
    for how in TEARS:
        torn = tmp_path / f"torn-{how.replace(' ', '-')}"
        shutil.copytree(interrupted, torn)
        _tear(torn / "checkpoints" / "trial-1" / "checkpoint-4", how)
        assert checkpoint_problem(torn / "checkpoints" / "trial-1" / "checkpoint-4") is not None, how
        assert cli.main([*run, "--output-dir", str(torn), "--resume"]) == 0, how
        printed = capsys.readouterr().out
        assert "Skipping the torn checkpoint" in printed and "checkpoint-4" in printed, how
        assert "Resuming from" in printed and "checkpoint-2" in printed, how
        assert_same_weights(weights(torn), straight)

    # A real SIGKILL in the middle of a checkpoint write, then --resume.
    killed = tmp_path / "killed"
    script = tmp_path / "killed_writer.py"
    script.write_text(KILLED_WRITER)
    completed = subprocess.run(
        [sys.executable, str(script), *run, "--output-dir", str(killed)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr[-2000:]
    assert checkpoint_problem(killed / "checkpoints" / "trial-1" / "checkpoint-4") is not None
    assert cli.main([*run, "--output-dir", str(killed), "--resume"]) == 0
    assert_same_weights(weights(killed), straight)


# --- Two processes (torchrun) ------------------------------------------------------------------------------

KILLED_AFTER_SAVE = """
import os, signal, sys
from transformers import TrainerCallback
from finetune import cli

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)

sys.exit(cli.main(sys.argv[1:], callbacks=[KillAfterSave()]))
"""


def test_two_processes_split_the_batch_write_one_folder_and_resume_after_a_kill(
    tmp_path, tiny_checkpoint, image_folder
):
    run = ["--model", str(tiny_checkpoint), "--train-dir", str(image_folder), "--num-workers", "0"]
    run += ["--max-steps", "4", "--save-steps", "2", "--batch-size", "8", "--micro-batch-size", "2"]
    run += ["--resolution", "40", "32", "--learning-rate", "0.05", "--trials", "2"]

    def launch(*command, output: Path):
        return subprocess.run(
            [*TORCHRUN, *command, *run, "--output-dir", str(output)],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=600,
            cwd=tmp_path,
        )

    whole = launch("-m", "finetune", output=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert whole.stdout.count("Trial 2 of 2: accuracy") == 1  # one process speaks
    rule = json.loads((tmp_path / "whole" / "bit_hyperrule.json").read_text())
    assert (rule["batch_size"], rule["micro_batch_size"], rule["processes"], rule["gradient_accumulation_steps"]) == (
        8,
        2,
        2,
        2,
    )
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(("whole", ".whole"))) == ["whole"]

    script = tmp_path / "killed_after_save.py"
    script.write_text(KILLED_AFTER_SAVE)
    killed = launch(str(script), output=tmp_path / "killed")
    assert killed.returncode != 0
    assert (tmp_path / "killed" / "checkpoints" / "trial-1" / "checkpoint-2").is_dir()
    resumed = launch("-m", "finetune", "--resume", output=tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming the run in" in resumed.stdout
    assert_same_weights(weights(tmp_path / "killed"), weights(tmp_path / "whole"))
    accuracies = [
        json.loads((tmp_path / name / "eval_results.json").read_text())["eval_accuracy_trials"]
        for name in ("killed", "whole")
    ]
    assert accuracies[0] == accuracies[1]


# --- The main job's grid: trials in parallel processes ----------------------------------------------------


def test_trials_in_parallel_processes_equal_the_same_trials_one_after_the_other(tmp_path, tiny_checkpoint):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    pixels = torch.rand(30, 3, 40, 40, generator=generator) * 0.2 - 1 + labels.view(-1, 1, 1, 1).float() * 0.5
    train = PreprocessedImages(pixels, labels, [])
    evaluation = PreprocessedImages(pixels[:, :, 4:36, 4:36].contiguous(), labels, [])
    data = ImageClassificationData(train, evaluation, ["a", "b", "c"], {"name": "generated"})
    overrides = {"steps": 3, "batch_size": 6, "precrop": 40, "crop": 32, "learning_rate": 0.05}

    def grid(root: Path) -> list[FinetuneJob]:
        return [
            FinetuneJob(
                model="bit-tiny" if scratch else str(tiny_checkpoint),
                from_scratch=scratch,
                data=data,
                rule_overrides=overrides,
                median_image_area=1600,
                examples_per_class=shots,
                trials=2,
                work_dir=root / f"{scratch}-{shots}",
                training={"dataloader_num_workers": 0},
                save_checkpoints=False,
                quiet=True,
            )
            for scratch, shots in ((False, 2), (True, None))
        ]

    serial = run_finetuning_jobs(grid(tmp_path / "serial"), processes=1)
    parallel = run_finetuning_jobs(grid(tmp_path / "parallel"), processes=2)
    assert [result.accuracies for result in serial] == [result.accuracies for result in parallel]
    for one, other in zip(serial, parallel, strict=True):
        assert_same_weights(weights(one.saved_model_dir()), weights(other.saved_model_dir()))


# --- Bad input ------------------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_weights_that_cannot_be_loaded_and_dangerous_output_folders_are_refused(
    tmp_path, tiny_checkpoint, image_folder, capsys, monkeypatch
):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[:8] + b"{garbage" + data[16:])
    evil = tmp_path / "evil"
    shutil.copytree(tiny_checkpoint, evil)
    (evil / "model.safetensors").unlink()
    torch.save({"weights": _Evil()}, evil / "pytorch_model.bin", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    monkeypatch.chdir(tmp_path)
    for model, message in ((corrupt, "SafetensorError"), (evil, "Weights only load failed")):
        status = cli.main(["--model", str(model), "--train-dir", str(image_folder), "--output-dir", "out", *SMALL_RUN])
        error = capsys.readouterr().err
        assert status == 2 and error.startswith("bit-finetune: error: --model") and message in error, error
        assert "Traceback" not in error
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()

    home = tmp_path / "home"
    (home / "work" / "project").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work" / "project")
    for output_dir, kind in (
        ("/", "a filesystem root"),
        (str(home), "your home directory"),
        (".", "the current directory"),
        ("..", "a folder that holds the current directory"),
    ):
        status = cli.main(
            ["--model", str(tiny_checkpoint), "--train-dir", str(image_folder), "--output-dir", output_dir]
        )
        assert status == 2 and kind in capsys.readouterr().err, output_dir
    assert sorted(path.name for path in home.rglob("*")) == ["project", "work"]


class _CountingHub(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        self.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        """No per-request log lines."""


def test_a_preset_name_without_from_scratch_is_refused_before_any_network_request(tmp_path, image_folder):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHub)
    for _ in serving(server):
        env = {**subprocess_env(), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
        env.pop("HF_HUB_OFFLINE")
        started = time.perf_counter()
        completed = subprocess.run(
            [sys.executable, "-m", "finetune", "--model", "bit-tiny", "--train-dir", str(image_folder)]
            + ["--output-dir", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        elapsed = time.perf_counter() - started
    assert (
        completed.returncode == 2 and "is a preset name" in completed.stderr and "--from-scratch" in completed.stderr
    )
    assert _CountingHub.requests == [] and elapsed < 60


# --- The rule's two variants ------------------------------------------------------------------------------


def test_the_released_rule_and_the_papers_side_by_side(tmp_path, image_folder):
    paper = BitHyperRule.from_dataset(1_000, 200 * 200)
    released = BitHyperRule.from_dataset(1_000, 200 * 200, variant="released")
    assert (paper.warmup_steps, paper.decay_steps, paper.crop) == (100, (150, 300, 450), 384)
    assert (released.warmup_steps, released.decay_steps, (released.precrop, released.crop)) == (
        100,
        (200, 300, 400),
        (512, 480),
    )
    medium = BitHyperRule.from_dataset(100_000, 200 * 200, variant="released")
    large = BitHyperRule.from_dataset(1_000_000, 50 * 50, variant="released")
    assert (medium.steps, medium.warmup_steps, medium.decay_steps) == (10_000, 500, (3000, 6000, 9000))
    assert (large.steps, large.warmup_steps, large.decay_steps, large.crop) == (20_000, 500, (6000, 12000, 18000), 128)
    assert BitHyperRule.from_dataset(1_000, 200 * 200, variant="released", steps=250).decay_steps == (100, 150, 200)

    arguments = cli.parse_arguments(
        ["--model", "bit-tiny", "--from-scratch", "--train-dir", str(image_folder), "--hyperrule", "released"]
        + ["--output-dir", str(tmp_path / "o"), "--num-workers", "0", *SMALL_RUN]
    )
    assert cli.finetune_on_user_data(arguments, []).rule.variant == "released"
    assert json.loads((tmp_path / "o" / "bit_hyperrule.json").read_text())["hyperrule"] == "released"
