"""Launchers and stopping, as a user meets them: the launch line that runs N processes, one message per
event from the main process, and a clean non-zero exit.

- `accelerate launch --num_processes N` alone runs one process on a machine without GPUs (accelerate needs
  `--multi_gpu` to start N, on GPUs or CPUs); `launch_prefix` gives the line that really runs N.
- SIGINT (Ctrl-C) or SIGTERM (a scheduler, or the launcher passing either on) asks the run to stop: every
  process finishes the step in flight, they agree to stop at the same step, save a checkpoint, and the main
  process says where it is and how to continue. A second signal stops at once.
- Bad input (`image_data.InputError`) found by every process alike is printed once, by the main process;
  one found by a DataLoader worker of one process, by that process. A process whose peer has already stopped
  exits without a traceback. The launcher may add its own report of the non-zero exit (torchrun's
  ChildFailedError summary, accelerate's CalledProcessError); the script cannot change that.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState

from image_data import InputError

from .recipe import gradient_accumulation_steps

PROGRAM = "pretrain"
SCRIPT = "pretraining/pretrain.py"
CONSOLE_SCRIPT = "bit-pretrain"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Exit statuses: bad input as argparse's; a stop by signal N as a shell reports it, 128 + N.
BAD_INPUT_STATUS = 2
PEER_STOPPED_STATUS = 1


def launched_by() -> str:
    """'accelerate', 'torchrun' or 'python': what started this process (from the environment they set)."""
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ:
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "python"


def launch_prefix(num_processes: int, launcher: str | None = None, distributed_type: str | None = None) -> list[str]:
    """The launcher part of a command line that runs `num_processes` processes of the script.

    With more than one process: `torchrun --nproc_per_node N` if that is what started this run, else
    `accelerate launch --multi_gpu --num_processes N` (DDP on GPUs, or on CPUs with gloo), or for FSDP,
    DeepSpeed and TPU runs the accelerate config file they need.
    """
    launcher = launcher or launched_by()
    if num_processes > 1:
        if launcher == "torchrun":
            return ["torchrun", "--nproc_per_node", str(num_processes)]
        if distributed_type not in (None, "MULTI_GPU", "MULTI_CPU", "NO"):
            return ["accelerate", "launch", "--config_file", "YOUR_ACCELERATE_CONFIG.yaml"]
        return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(num_processes)]
    return ["accelerate", "launch"] if launcher == "accelerate" else ["python"]


def script_name(num_processes: int) -> list[str]:
    """How the command line names the script: `bit-pretrain` when that started a one-process run, else its
    path (relative to the current folder when inside it)."""
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if started.name == CONSOLE_SCRIPT and num_processes == 1:
        return [CONSOLE_SCRIPT]
    if started.name == "pretrain.py":
        relative = os.path.relpath(started.resolve())
        return [relative if not relative.startswith("..") else str(started)]
    return [SCRIPT]


def resume_command(argv: list[str], num_processes: int, distributed_type: str | None = None) -> str:
    """The run's own command line, continuing it: --resume-from-checkpoint latest (no --overwrite-output-dir)."""
    arguments, skip = [], 0
    for index, argument in enumerate(argv):
        if skip:
            skip -= 1
            continue
        name = argument.split("=", 1)[0].replace("_", "-")
        if name == "--resume-from-checkpoint":
            skip = 0 if "=" in argument else 1
        elif name == "--overwrite-output-dir":
            follows = argv[index + 1] if index + 1 < len(argv) else ""
            skip = 1 if "=" not in argument and follows.lower() in ("true", "false", "yes", "no", "1", "0") else 0
        else:
            arguments.append(argument)
    prefix = (
        [] if script_name(num_processes) == [CONSOLE_SCRIPT] else launch_prefix(num_processes, None, distributed_type)
    )
    return shlex.join([*prefix, *script_name(num_processes), *arguments, "--resume-from-checkpoint", "latest"])


def start_accelerator(
    mixed_precision: str | None, global_batch_size: int, per_device_batch_size: int, report_to: str, project_dir: Path
):
    """(the Accelerator, gradient accumulation steps, the trackers): accumulation = global batch / (per-device
    batch x processes), refused when that does not divide."""
    # accelerate treats a torchrun launch on CPU-only machines as multi-CPU (gloo) only when told to use the CPU.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    processes = PartialState(cpu=cpu).num_processes
    accumulation = gradient_accumulation_steps(global_batch_size, per_device_batch_size, processes)
    trackers = {"none": None, "all": ["tensorboard", "trackio"]}.get(report_to, [report_to])
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=accumulation,
        log_with=trackers,
        project_dir=str(project_dir),
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate runs fp16 on a CPU as plain float32, without a word: refuse rather than mislabel the run.
        raise InputError(
            "--mixed-precision fp16 (or the accelerate config's) needs a GPU: on a CPU it would silently train in "
            "float32. Use --mixed-precision bf16 (CPU autocast) or no."
        )
    return accelerator, accumulation, trackers


class StopRequests:
    """While active, SIGINT and SIGTERM ask the run to stop at the next step boundary (`received`); a second
    one raises KeyboardInterrupt at once. The previous handlers come back on exit."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = number


def agree_on_step(accelerator, readable_images: int, stop_requested: bool) -> tuple[int, bool]:
    """(readable images of the step over all processes, whether any process asked to stop): one reduction, so
    every process stops at the same step."""
    if accelerator.num_processes == 1:
        return readable_images, stop_requested
    values = torch.tensor([readable_images, int(stop_requested)], device=accelerator.device)
    total, stop = accelerator.reduce(values, reduction="sum").tolist()
    return int(total), bool(stop)


class Stopped(Exception):
    """The run stopped on a signal at a step boundary, after saving `checkpoint`."""

    def __init__(self, signal_number: int, step: int, total_steps: int, checkpoint: Path | None, resume: str):
        name = signal.Signals(signal_number).name
        if checkpoint is None:
            message = f"stopped by {name} before its first step; nothing to save. Run the command again to start."
        else:
            message = (
                f"stopped by {name} after step {step} of {total_steps}; saved {checkpoint}. Continue with:\n  {resume}"
            )
        super().__init__(message)
        self.status = 128 + signal_number


def is_main_process() -> bool:
    """The main process of the run (before accelerate's state exists: global rank 0 as the launcher set it)."""
    if PartialState._shared_state:
        return PartialState().is_main_process
    return int(os.environ.get("RANK", "0")) == 0


def worker_error_message(error: InputError) -> tuple[str, bool]:
    """(the message of an InputError, whether a DataLoader worker raised it).

    torch re-raises a worker's exception as the same type with the worker's traceback as its message; the
    original message is that traceback's last line, after the exception's name.
    """
    message = str(error)
    if "Original Traceback" not in message:
        return message, False
    last = message.strip().splitlines()[-1]
    return last.split(f"{type(error).__name__}: ", 1)[-1], True


def _say(message: str) -> None:
    print(f"{PROGRAM}: {message}", file=sys.stderr, flush=True)


def _leave_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def one_message_and_a_clean_exit(interrupted_hint):
    """Turn bad input, a stop and a peer's failure into one message (from the main process) and an exit status.

    `interrupted_hint()` says what to do after a KeyboardInterrupt (a second signal, or one before training).
    """
    try:
        yield
    except InputError as error:
        message, from_worker = worker_error_message(error)
        if from_worker or is_main_process():
            where = f" (process {PartialState().process_index})" if from_worker and _processes() > 1 else ""
            _say(f"error{where}: {message}")
        _leave_process_group()
        raise SystemExit(BAD_INPUT_STATUS) from None
    except Stopped as stopped:
        if is_main_process():
            _say(str(stopped))
        _leave_process_group()
        raise SystemExit(stopped.status) from None
    except KeyboardInterrupt:
        if is_main_process():
            _say(f"interrupted. {interrupted_hint()}")
        _leave_process_group()
        raise SystemExit(128 + signal.SIGINT) from None
    except RuntimeError as error:  # torch.distributed.DistError is one; gloo reports a peer gone as a plain one
        if _processes() == 1 or not _peer_gone(error):
            raise
        if is_main_process():
            _say("stopped: another process of the run ended first (its message, if any, is above).")
        raise SystemExit(PEER_STOPPED_STATUS) from None


# How the process-group backends report a collective whose peer has exited.
PEER_GONE_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker")


def _peer_gone(error: RuntimeError) -> bool:
    return isinstance(error, torch.distributed.DistError) or any(text in str(error) for text in PEER_GONE_MESSAGES)


def _processes() -> int:
    return PartialState().num_processes if PartialState._shared_state else int(os.environ.get("WORLD_SIZE", "1"))
