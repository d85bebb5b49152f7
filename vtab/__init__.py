"""VTAB-1k, the BiT paper's benchmark (§3.2, Fig. 3), as one command: `bit-vtab`.

- `vtab.registry`: the 19 tasks, one cited row each (source, label, group, flip/crop), and task files for your own.
- `vtab.labels`: VTAB's label derivations (object counts, distance bins, binned positions and angles).
"""

from .registry import GROUPS, REGISTRY, TaskSource, VtabTask, load_task_file, registry_task, select_tasks

__all__ = ["GROUPS", "REGISTRY", "TaskSource", "VtabTask", "load_task_file", "registry_task", "select_tasks"]
