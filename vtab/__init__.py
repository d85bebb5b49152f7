"""VTAB-1k, the BiT paper's benchmark (§3.2, Fig. 3), as one command: `bit-vtab`.

- `vtab.registry`: the 19 tasks, one cited row each (source, label, group, flip/crop), and task files for your own.
- `vtab.labels`: VTAB's label derivations (object counts, distance bins, binned positions and angles).
- `vtab.data`: a task's 800 + 200 training examples and its test split, read once into the run's folder.
- `vtab.runner`: every task through the fine-tuning engine (`finetune.engine.run_finetuning`), resumable.
- `vtab.results`, `vtab.card`: `vtab_results.json`, the table per task / group / mean, the bar chart, the card.
"""

from .registry import GROUPS, REGISTRY, TaskSource, VtabTask, load_task_file, registry_task, select_tasks
from .runner import VtabSettings, run_vtab

__all__ = [
    "GROUPS",
    "REGISTRY",
    "TaskSource",
    "VtabSettings",
    "VtabTask",
    "load_task_file",
    "registry_task",
    "run_vtab",
    "select_tasks",
]
