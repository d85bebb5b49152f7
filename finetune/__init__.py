"""Fine-tuning BiT with BiT-HyperRule on the Hugging Face Trainer.

- `BitHyperRule` (`finetune.hyperrule`): the rule, derived from a dataset, every field overridable; the paper's
  and the released code's variants.
- `FinetuneJob`, `run_finetuning` (`finetune.engine`): the one fine-tuning engine every job calls (the command
  line, its main job, and the tools built on them): trials, few-shot subsets, resume, the output folder.
- `BitTrainer`, `BitTrainingArguments` (`finetune.trainer`): a `transformers.Trainer` with the rule's SGD +
  staircase schedule and MixUp in the training loss.
- `bit-finetune` / `python -m finetune` (`finetune.cli`): the command line, and its main job (`finetune.main_job`).
"""

from .engine import FinetuneJob, FinetuneResult, TrialResult, run_finetuning, run_finetuning_jobs
from .errors import FinetuneInputError
from .hyperrule import BitHyperRule, choose_micro_batch_size
from .models import load_model_for_labels
from .trainer import BitTrainer, BitTrainingArguments

__all__ = [
    "BitHyperRule",
    "BitTrainer",
    "BitTrainingArguments",
    "FinetuneInputError",
    "FinetuneJob",
    "FinetuneResult",
    "TrialResult",
    "choose_micro_batch_size",
    "load_model_for_labels",
    "run_finetuning",
    "run_finetuning_jobs",
]
