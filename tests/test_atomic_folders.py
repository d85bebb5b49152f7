"""Atomic folders (`modeling_bit.file_utils.atomic_directory`) under concurrent writers and killed processes.

Every writer here is a real process; the killed one gets a real SIGKILL. The child processes load file_utils.py by
its path, without importing the package (and torch), so that they start in a fraction of a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import REPO_ROOT

from modeling_bit.file_utils import _owner_tag, atomic_directory  # the staging names' owner part

FILE_UTILS = REPO_ROOT / "modeling_bit" / "file_utils.py"
LOAD_FILE_UTILS = f"""
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("file_utils", {str(FILE_UTILS)!r})
file_utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(file_utils)
"""


def start_writer(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LOAD_FILE_UTILS + textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def hidden_entries(parent: Path) -> list[str]:
    return sorted(entry.name for entry in parent.iterdir() if entry.name.startswith("."))


def test_two_processes_writing_the_same_folder_both_succeed_and_the_last_one_wins_whole(tmp_path):
    target, rounds, parts = tmp_path / "out", 300, 3  # enough rounds for the renames to race (they did before)
    go = tmp_path / "go"
    writers = [
        start_writer(f"""
            target, go = Path({str(target)!r}), Path({str(go)!r})
            while not go.exists():
                time.sleep(0.001)
            for round in range({rounds}):
                with file_utils.atomic_directory(target) as staging:
                    for part in range({parts}):
                        (staging / f"part-{{part}}.txt").write_text("{name}-" + str(round))
            print("done")
        """)
        for name in ("a", "b")
    ]
    go.touch()
    results = [writer.communicate(timeout=120) for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], [error for _, error in results]
    contents = {path.read_text() for path in target.iterdir()}
    assert sorted(path.name for path in target.iterdir()) == [f"part-{part}.txt" for part in range(parts)]
    assert len(contents) == 1 and contents.pop() in {f"a-{rounds - 1}", f"b-{rounds - 1}"}  # one writer's, whole
    assert hidden_entries(tmp_path) == []  # no staging or replaced folder left behind
    later = start_writer(f"""
        with file_utils.atomic_directory(Path({str(target)!r})) as staging:
            (staging / "part-0.txt").write_text("later")
    """)
    later.communicate(timeout=60)
    assert [path.read_text() for path in target.iterdir()] == ["later"]


def test_staging_of_a_killed_process_is_removed_by_the_next_write_into_the_same_parent(tmp_path):
    sleepers = {
        name: start_writer(f"""
            with file_utils.atomic_directory(Path({str(tmp_path / name)!r})) as staging:
                (staging / "model.safetensors").write_bytes(bytes(1 << 20))
                print("staged", flush=True)
                time.sleep(120)
        """)
        for name in ("killed", "running")
    }
    try:
        for sleeper in sleepers.values():
            assert sleeper.stdout.readline() == "staged\n"
        sleepers["killed"].send_signal(signal.SIGKILL)
        sleepers["killed"].wait(timeout=30)
        staged = hidden_entries(tmp_path)
        assert len(staged) == 2 and all(name.endswith(".partial") for name in staged)

        with atomic_directory(tmp_path / "next") as staging:  # another folder, in the same parent
            (staging / "config.json").write_text("{}")
        left = hidden_entries(tmp_path)
        assert len(left) == 1 and left[0].startswith(".running.")  # a running writer's staging folder is kept
        assert not (tmp_path / "killed").exists() and (tmp_path / "next" / "config.json").is_file()
    finally:
        for sleeper in sleepers.values():
            sleeper.kill()
            sleeper.communicate(timeout=30)


def test_a_folder_moved_aside_by_a_process_killed_mid_swap_is_put_back(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    while True:  # that process is gone; make sure its pid was not taken again meanwhile
        try:
            os.kill(dead_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    owner = _owner_tag(dead_pid)
    # What a writer killed between its two renames leaves: the old folder moved aside, the new one still staged.
    old = tmp_path / f".out.{owner}0a1b2c3d.previous"
    old.mkdir()
    (old / "config.json").write_text("old, complete")
    (tmp_path / f".out.{owner}x7y8z9w0.partial").mkdir()
    with atomic_directory(tmp_path / "other") as staging:
        (staging / "config.json").write_text("{}")
    assert (tmp_path / "out" / "config.json").read_text() == "old, complete"
    assert hidden_entries(tmp_path) == []
