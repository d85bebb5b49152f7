"""`BitTrainer`: a `transformers.Trainer` that fine-tunes with BiT-HyperRule and MixUp.

- `BitTrainingArguments.from_hyperrule(rule, output_dir)` turns a `BitHyperRule` into training
  arguments: SGD with momentum 0.9 and no weight decay (the Trainer's own "sgd" optimizer), no gradient
  clipping, `max_steps`, micro-batch x gradient accumulation = the rule's batch, linear warmup, and the
  staircase decays (x0.1 at 30/60/90% of the steps), which `BitTrainer.create_scheduler` builds.
  `BitTrainer(model, hyperrule=rule, ...)` does this itself; pass your own `args` (or `optimizers`) to
  train with anything else.
- MixUp inside the training loss (`compute_loss`): one lambda ~ Beta(alpha, alpha) per optimizer step
  (BiT's released code draws one per batch; with gradient accumulation every micro-batch of the step
  shares it), each image mixed with another of its micro-batch given by a random permutation (so a
  micro-batch of one image cannot be mixed: the trainer warns), soft
  targets lambda * y + (1 - lambda) * y[permutation]. Works for single-label (soft cross-entropy) and
  multi-label (binary cross-entropy on the mixed multi-hot targets) heads. Evaluation never mixes.
  lambda and the permutation are seeded by (seed, step, micro-batch), so a resumed run mixes as the
  uninterrupted one would.
- Batches from `finetune.preprocessing` name their unreadable images under `unreadable_images`; the
  trainer drops that key and collects the names in `trainer.unreadable_images`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from .distributed import process_state
from .hyperrule import DECAY_FACTOR, BitHyperRule, learning_rate_multiplier, mixup_micro_batch_warning
from .preprocessing import HyperRuleTrainingStream
from .regularizers import InitialWeightDecay, PreLogitsDropout

logger = logging.getLogger(__name__)

UNREADABLE_KEY = "unreadable_images"
# Log the training loss this many times per run; checkpoint this many times per run (the last one kept).
LOGS_PER_RUN = 50
CHECKPOINTS_PER_RUN = 10


@dataclasses.dataclass
class BitTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the two parts of BiT-HyperRule the Trainer has no argument for."""

    lr_decay_steps: list[int] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "Optimizer steps after which the learning rate is multiplied by lr_decay_factor (staircase)."
        },
    )
    lr_decay_factor: float = dataclasses.field(
        default=DECAY_FACTOR, metadata={"help": "Factor of each staircase decay."}
    )
    mixup_alpha: float = dataclasses.field(default=0.0, metadata={"help": "MixUp Beta(alpha, alpha); 0 turns it off."})
    # The random search's regularisers (paper Appendix A; finetune.regularizers); BiT-HyperRule uses neither.
    pre_logits_dropout: float = dataclasses.field(
        default=0.0, metadata={"help": "Dropout rate on the pre-logits (the classifier's input) while training."}
    )
    decay_to_initial_weights: float = dataclasses.field(
        default=0.0, metadata={"help": "Strength of the weight decay toward the weights training started from."}
    )

    @classmethod
    def from_hyperrule(cls, rule: BitHyperRule, output_dir: str, **overrides) -> BitTrainingArguments:
        """Training arguments that run `rule` (its micro-batch must be chosen, `BitHyperRule.for_device`);
        `overrides` are further `TrainingArguments` fields (precision, logging, saving, workers, seed, ...)."""
        micro_batch = rule.micro_batch_size
        if micro_batch is None:
            raise ValueError("The rule's micro-batch is not chosen yet: use BitHyperRule.for_device first.")
        values = {
            "output_dir": output_dir,
            "max_steps": rule.steps,
            "per_device_train_batch_size": micro_batch,
            "per_device_eval_batch_size": 2 * micro_batch,  # no activations kept for backward
            "gradient_accumulation_steps": rule.gradient_accumulation_steps(),
            "learning_rate": rule.learning_rate,
            "optim": "sgd",
            "optim_args": f"momentum={rule.momentum}",
            "weight_decay": rule.weight_decay,
            "max_grad_norm": 0.0,  # BiT does not clip gradients
            "warmup_steps": rule.warmup_steps,
            "lr_scheduler_type": "constant_with_warmup",  # plus the decays, added by BitTrainer
            "lr_decay_steps": list(rule.decay_steps),
            "lr_decay_factor": rule.decay_factor,
            "mixup_alpha": rule.mixup_alpha,
            "logging_steps": max(1, rule.steps // LOGS_PER_RUN),
            "save_strategy": "steps",
            "save_steps": max(1, rule.steps // CHECKPOINTS_PER_RUN),
            "save_total_limit": 1,
            "remove_unused_columns": False,  # batches carry `unreadable_images` for the trainer
            "report_to": "none",
        }
        values.update(overrides)
        return cls(**values)


# --- MixUp ---------------------------------------------------------------------------------------


def mixup_lambda(alpha: float, seed: int, step: int) -> float:
    """lambda ~ Beta(alpha, alpha) for optimizer step `step`."""
    return float(np.random.default_rng((seed, 2, step)).beta(alpha, alpha))


def mixup_permutation(batch_size: int, seed: int, step: int, micro_batch: int, process: int = 0) -> torch.Tensor:
    """Partner of each image of a micro-batch."""
    return torch.from_numpy(np.random.default_rng((seed, 3, step, micro_batch, process)).permutation(batch_size))


def soft_targets(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Class ids -> one-hot float targets; multi-hot (float) targets unchanged."""
    if labels.is_floating_point():
        return labels
    return F.one_hot(labels.long(), num_labels).float()


def mix(
    pixel_values: torch.Tensor, targets: torch.Tensor, lam: float, permutation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp of a batch with its permutation: lam * x + (1 - lam) * x[permutation], same for targets."""
    permutation = permutation.to(pixel_values.device)
    mixed_pixels = lam * pixel_values + (1 - lam) * pixel_values[permutation]
    mixed_targets = lam * targets + (1 - lam) * targets[permutation]
    return mixed_pixels, mixed_targets


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Mean loss against soft targets: cross-entropy over classes, or per-class binary cross-entropy.

    Both are linear in the targets, so the loss of mixed targets is the lambda-weighted sum of the
    losses against the two label sets.
    """
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets.to(logits.dtype))


def is_multi_label(model: torch.nn.Module, labels: torch.Tensor) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "problem_type", None) == "multi_label_classification":
        return True
    return labels.is_floating_point() and labels.ndim == 2


# --- The trainer ---------------------------------------------------------------------------------


class BitTrainer(Trainer):
    """`transformers.Trainer` with BiT-HyperRule's optimizer and schedule, and MixUp in the loss.

    Args:
        model: the model to fine-tune (e.g. `finetune.models.load_model_for_labels(...)`).
        args: training arguments. Default: built from `hyperrule` (`BitTrainingArguments.from_hyperrule`),
            choosing the micro-batch for this device when the rule does not give one. Plain
            `TrainingArguments` train with their own optimizer and schedule.
        hyperrule: the `BitHyperRule` to train with when `args` is not given.
        output_dir: where checkpoints go when the arguments are built from `hyperrule`.
        mixup_alpha: MixUp's alpha; default: `args.mixup_alpha` for `BitTrainingArguments`, else off.
        Other keyword arguments are the Trainer's (`train_dataset`, `eval_dataset`, `data_collator`,
        `compute_metrics`, `callbacks`, `optimizers`, ...).

    After training, `trainer.hyperrule` is the rule it ran (with the chosen micro-batch),
    `trainer.unreadable_images` the images skipped, and `trainer.evaluated_examples` the number of
    examples the last `evaluate()` scored.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        hyperrule: BitHyperRule | None = None,
        output_dir: str | None = None,
        mixup_alpha: float | None = None,
        **kwargs,
    ):
        if args is None:
            if hyperrule is None:
                raise ValueError("BitTrainer needs `args` or a `hyperrule` to build them from.")
            state = process_state()
            hyperrule = hyperrule.for_device(model, state.device, state.num_processes)
            args = BitTrainingArguments.from_hyperrule(hyperrule, output_dir or "bit-finetune-output")
        if args.remove_unused_columns:
            # Our batches carry `unreadable_images`, which column removal would strip from the examples.
            args.remove_unused_columns = False
        self.hyperrule = hyperrule
        if mixup_alpha is None:
            mixup_alpha = args.mixup_alpha if isinstance(args, BitTrainingArguments) else 0.0
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha={mixup_alpha}: expected >= 0 (0 turns MixUp off).")
        self.mixup_alpha = float(mixup_alpha)
        warning = mixup_micro_batch_warning(self.mixup_alpha, args.per_device_train_batch_size)
        if warning:
            logger.warning(warning)
        self.unreadable_images: set[str] = set()
        self.evaluated_examples = 0  # by the last evaluate(): readable examples over all processes
        self._mixup_counter = (-1, 0)  # (optimizer step, micro-batches seen in it)
        self._initial_weights: InitialWeightDecay | None = None
        self._pre_logits_dropout: PreLogitsDropout | None = None
        super().__init__(model=model, args=args, **kwargs)
        if self._initial_weights is None:
            self._capture_initial_weights(self.model)
        # compute_loss returns the mean over its micro-batch; let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """The Trainer's log, with `epoch` counted over the training set: the Trainer sees the whole run as one
        pass over a `HyperRuleTrainingStream`, whose epochs are passes over the examples."""
        stream = self.train_dataset
        if not isinstance(stream, HyperRuleTrainingStream):
            return super().log(logs, start_time)
        batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        seen_by_the_trainer = self.state.epoch
        self.state.epoch = round(self.state.global_step * batch / len(stream.source), 4)
        try:
            super().log(logs, start_time)
        finally:
            self.state.epoch = seen_by_the_trainer

    # --- regularisers of the random search (finetune.regularizers) ---

    def _capture_initial_weights(self, model: torch.nn.Module | None) -> None:
        """Remember the weights training starts from (before any checkpoint is resumed into them), when a decay
        toward them may be asked: by the arguments, or by a hyper-parameter search's trials (model_init)."""
        if model is not None and (getattr(self.args, "decay_to_initial_weights", 0.0) > 0 or self.model_init):
            self._initial_weights = InitialWeightDecay(model, 0.0)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        self._capture_initial_weights(model)
        return model

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the decay toward the initial weights before each step and dropout on the
        pre-logits when `BitTrainingArguments` ask for them."""
        optimizer = super().create_optimizer(model)
        decay = getattr(self.args, "decay_to_initial_weights", 0.0)
        if self._initial_weights is not None:
            self._initial_weights.detach()
            if decay > 0:
                self._initial_weights.strength = float(decay)
                self._initial_weights.attach(optimizer)
        elif decay > 0:
            raise ValueError("decay_to_initial_weights needs the initial weights, captured when the model is given.")
        if self._pre_logits_dropout is not None:
            self._pre_logits_dropout.remove()
            self._pre_logits_dropout = None
        rate = getattr(self.args, "pre_logits_dropout", 0.0)
        if rate > 0:
            self._pre_logits_dropout = PreLogitsDropout(self.accelerator.unwrap_model(model or self.model), rate)
        return optimizer

    # --- schedule and data order ---

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """BiT's schedule (linear warmup, then x`lr_decay_factor` after each of `lr_decay_steps`) for
        `BitTrainingArguments` with decay steps; the Trainer's own otherwise."""
        decay_steps = getattr(self.args, "lr_decay_steps", None)
        if self.lr_scheduler is None and decay_steps:
            multiplier = functools.partial(
                learning_rate_multiplier,
                warmup_steps=self.args.get_warmup_steps(num_training_steps),
                decay_steps=tuple(decay_steps),
                decay_factor=self.args.lr_decay_factor,
            )
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, multiplier)
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    def _get_train_sampler(self, train_dataset=None):
        # A HyperRuleTrainingStream already orders its positions (seeded shuffling per epoch).
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, HyperRuleTrainingStream):
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    # --- loss ---

    def _take_unreadable(self, inputs: dict) -> dict:
        inputs = dict(inputs)
        self.unreadable_images.update(inputs.pop(UNREADABLE_KEY, None) or ())
        return inputs

    def mixup_draw(self, batch_size: int) -> tuple[float, torch.Tensor]:
        """(lambda, permutation) for the next micro-batch of the current optimizer step."""
        step = self.state.global_step
        last_step, seen = self._mixup_counter
        micro_batch = seen if step == last_step else 0
        self._mixup_counter = (step, micro_batch + 1)
        lam = mixup_lambda(self.mixup_alpha, self.args.seed, step)
        return lam, mixup_permutation(batch_size, self.args.seed, step, micro_batch, self.args.process_index)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = self._take_unreadable(inputs)
        pixel_values = inputs.pop("pixel_values")
        labels = inputs.pop("labels", None)
        if pixel_values.shape[0] == 0:  # every image of this micro-batch was unreadable
            loss = sum(parameter.sum() for parameter in model.parameters() if parameter.requires_grad) * 0.0
            return (loss, None) if return_outputs else loss
        if model.training and self.mixup_alpha > 0 and labels is not None:
            lam, permutation = self.mixup_draw(pixel_values.shape[0])
            multi_label = is_multi_label(self.accelerator.unwrap_model(model), labels)
            num_labels = self.accelerator.unwrap_model(model).config.num_labels
            pixel_values, targets = mix(pixel_values, soft_targets(labels, num_labels), lam, permutation)
            outputs = model(pixel_values=pixel_values, **inputs)
            loss = soft_target_loss(outputs.logits, targets, multi_label)
        else:
            outputs = model(pixel_values=pixel_values, labels=labels, **inputs)
            loss = outputs.loss
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        # Gathered over all processes without the padding of uneven shards; unreadable images are not among them.
        self.evaluated_examples = 0 if output.label_ids is None else len(output.label_ids)
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._take_unreadable(inputs)
        if inputs["pixel_values"].shape[0] == 0:
            return None, None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
