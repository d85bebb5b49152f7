"""Shared test helpers: real test images, randomized small models, and a clean Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_data() -> Path:
    """`../shared/data` beside the repository (as CI sees it), or $BIT_TEST_DATA."""
    candidates = [os.environ.get("BIT_TEST_DATA"), REPO_ROOT.parent / "shared" / "data", Path("/work/shared/data")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "hymenoptera").is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        "The real test images are missing: expected ../shared/data/hymenoptera beside the repository "
        "(or set BIT_TEST_DATA to the folder that holds hymenoptera/)."
    )


@pytest.fixture(scope="session")
def hymenoptera_dir() -> Path:
    return find_shared_data() / "hymenoptera"


@pytest.fixture(scope="session")
def ant_image_path(hymenoptera_dir) -> Path:
    return sorted((hymenoptera_dir / "val" / "ants").glob("*.jpg"))[0]


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norms and head (the default init makes them ones/zeros), so parity means something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".weight") and ("norm" in name):
                parameter.copy_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator))
            elif "norm" in name or "classifier" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A bit-tiny 'upstream' checkpoint: random weights, non-trivial norms and head (`randomize_`), the preset's
    labels, a 32-px image processor. Tests copy it before changing it."""
    from modeling_bit import BitConfig, BitForImageClassification, bit_image_processor

    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    torch.manual_seed(0)
    randomize_(BitForImageClassification(BitConfig.from_preset("bit-tiny"))).save_pretrained(folder)
    bit_image_processor(32).save_pretrained(folder)
    return folder


def run_clean_python(code: str, timeout: float = 300) -> dict:
    """Run `code` in a fresh interpreter that must never import our package; return its JSON result.

    The code assigns a JSON-serializable `result`.
    """
    wrapped = textwrap.dedent(code) + textwrap.dedent(
        """
        import json, sys
        assert not any(m == "modeling_bit" or m.startswith("modeling_bit.") for m in sys.modules), "imported ours"
        print("RESULT:" + json.dumps(result))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    completed = subprocess.run(
        [sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=timeout, env=env, cwd="/"
    )
    if completed.returncode != 0:
        raise AssertionError(f"clean process failed:\n{completed.stdout}\n{completed.stderr}")
    line = [line for line in completed.stdout.splitlines() if line.startswith("RESULT:")][-1]
    return json.loads(line[len("RESULT:") :])


def serving(server) -> Iterator:
    """Run a loopback `socketserver` in a background thread for the duration of a fixture; yield it."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
