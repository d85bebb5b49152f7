"""Fine-tuning BiT with BiT-HyperRule on the Hugging Face Trainer.

- `BitHyperRule` (`finetune.hyperrule`): the rule, derived from a dataset, every field overridable.
- `BitTrainer`, `BitTrainingArguments` (`finetune.trainer`): a `transformers.Trainer` with the rule's
  SGD + staircase schedule and MixUp in the training loss.
- `bit-finetune` / `python -m finetune` (`finetune.cli`): the command line, and its main job.
"""

from .errors import FinetuneInputError
from .hyperrule import BitHyperRule, choose_micro_batch_size
from .models import load_model_for_labels
from .trainer import BitTrainer, BitTrainingArguments

__all__ = [
    "BitHyperRule",
    "BitTrainer",
    "BitTrainingArguments",
    "FinetuneInputError",
    "choose_micro_batch_size",
    "load_model_for_labels",
]
