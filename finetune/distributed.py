"""Where this process stands in a run: alone, or one of a launcher's processes (torchrun, accelerate launch)."""

from __future__ import annotations

import torch
from accelerate import PartialState


def accelerator_available() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def process_state() -> PartialState:
    """This process's place in the run. On a machine without an accelerator, accelerate counts the processes of
    a launcher only when asked for CPU processes, as the Trainer asks with `use_cpu`; asked without it, every
    process would believe it is the only one (and the first one decides for all later askers)."""
    return PartialState(cpu=not accelerator_available())
