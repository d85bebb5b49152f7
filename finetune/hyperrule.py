"""BiT-HyperRule: the one fine-tuning setting of BiT, derived from the dataset itself.

Every number of the rule lives here, named, with its source: docs/recipe.md "BiT-HyperRule", which summarises
the BiT paper (Kolesnikov et al.): §2.2 "Transfer to Downstream Tasks" with its Table 1, §3.3 "Hyperparameter
Details" (paragraph "Downstream Fine-Tuning"), §3.5 "Evaluation On Low-data Regime" (few-shot trials) and
Appendix B (flips and crops for VTAB), and the released code's `bit_hyperrule.py` where it differs. That text
calls the rule "BiT-hyperparam"; the later version of the paper and the released code call it BiT-HyperRule,
the name used here.

Two variants (`--hyperrule`): "paper", the paper's text (decays at 30/60/90 % of the steps, 448/384 for large
images), and "released", the released code's schedule (small tasks warm up 100 steps and decay at 200/300/400
of 500) and resolution (512/480). `BitHyperRule.from_dataset(dataset_size, median_image_area, **overrides)`
computes the rule from the training-set size and the median image area; any field can be overridden, and the
record lists which were. `BitHyperRule.for_device` chooses the per-device micro-batch (the one place it is
chosen) so that gradient accumulation keeps the effective batch at the rule's 512 on a device that cannot
hold it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from modeling_bit.file_utils import atomic_write_json
from modeling_bit.folder_layout import HYPERRULE_FILE
from modeling_bit.modeling_bit import MIN_IMAGE_SIZE

from .errors import FinetuneInputError

logger = logging.getLogger(__name__)

# --- The rule (docs/recipe.md "BiT-HyperRule"; paper §2.2 Table 1 and §3.3 "Downstream Fine-Tuning") ---
# Optimizer: SGD, momentum 0.9, base learning rate 0.003, batch 512, no weight decay, no dropout.
LEARNING_RATE = 0.003
BATCH_SIZE = 512
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 0.0
# Resolution from the task's images: area < 96x96 -> resize 160, random crop 128; otherwise resize 448,
# crop 384 (BiT-S/M). The released code (and BiT-L) uses 512/480 for the large images.
SMALL_IMAGE_AREA = 96 * 96
SMALL_IMAGE_RESOLUTION = (160, 128)
LARGE_IMAGE_RESOLUTION = (448, 384)
LARGE_IMAGE_RESOLUTION_BIT_L = (512, 480)
# Schedule by training-set size: < 20k examples -> 500 steps; < 500k -> 10k steps; else 20k steps.
SMALL_TASK_EXAMPLES = 20_000
MEDIUM_TASK_EXAMPLES = 500_000
STEPS = {"small": 500, "medium": 10_000, "large": 20_000}
# Linear warmup, from the released code (the paper gives no fine-tuning warmup): 100 steps for small tasks,
# 500 otherwise; both variants warm up so.
WARMUP_STEPS = {"small": 100, "medium": 500, "large": 500}
# The paper's text: the learning rate is multiplied by 0.1 at 30%, 60% and 90% of the steps (§3.3).
DECAY_FRACTIONS = (0.3, 0.6, 0.9)
DECAY_FACTOR = 0.1
# The released code (`bit_hyperrule.get_schedule`): [warmup, decay 1, decay 2, decay 3, end] per regime. For
# small tasks the decays sit at 40/60/80 % instead of 30/60/90 %; medium and large tasks decay as the paper
# says. (Its `get_lr` divides once the step has passed a boundary, one step later than "at" it; here every
# variant decays once the boundary's steps are done.)
RELEASED_SCHEDULES = {
    "small": (100, 200, 300, 400, 500),
    "medium": (500, 3000, 6000, 9000, 10_000),
    "large": (500, 6000, 12_000, 18_000, 20_000),
}
# `--hyperrule`: the paper's text, or the released code's schedule and resolution.
PAPER, RELEASED = "paper", "released"
HYPERRULE_VARIANTS = (PAPER, RELEASED)
# MixUp with alpha 0.1 for tasks with >= 20k examples (medium and large), none below (§3.3, Table 1).
MIXUP_ALPHA = 0.1
MIXUP_MIN_EXAMPLES = SMALL_TASK_EXAMPLES
# Few-shot protocol (§3.5, Fig. 2): k examples per class drawn at random, balanced; 5 random subsets,
# report the median.
FEW_SHOT_TRIALS = 5
# Labels that random flips or crops would destroy (paper Appendix B, VTAB-1k): no flip for dSprites
# orientation, SmallNORB azimuth, dSprites location; no crop for Clevr count/distance, DMLab, KITTI
# distance, dSprites location. Exposed as the `--no-flip` / `--no-crop` options.
NO_FLIP_TASKS = ("dSprites/orientation", "SmallNORB/azimuth", "dSprites/location")
NO_CROP_TASKS = ("Clevr/count", "Clevr/distance", "DMLab", "KITTI/distance", "dSprites/location")

# When the batch is changed, the learning rate follows it linearly: the paper scales its upstream rate
# "multiplicatively by batch size/256" (§3.3 "Upstream Pre-Training", after Goyal et al.); the HyperRule's
# 0.003 is its value
# at batch 512. Same examples seen per unit of learning rate, so the schedule's meaning is kept.
LEARNING_RATE_REFERENCE_BATCH = BATCH_SIZE

# Images whose sizes are read (from the file headers, nothing decoded) to estimate the median area.
IMAGE_SIZE_SAMPLE = 1000

HYPERRULE_FILE_NAME = HYPERRULE_FILE


def task_regime(dataset_size: int) -> str:
    """'small' (< 20k examples), 'medium' (< 500k) or 'large'."""
    if dataset_size < SMALL_TASK_EXAMPLES:
        return "small"
    if dataset_size < MEDIUM_TASK_EXAMPLES:
        return "medium"
    return "large"


def resolution_for_area(median_image_area: float, large_resolution: tuple[int, int] = LARGE_IMAGE_RESOLUTION):
    """(precrop, crop): 160/128 for images smaller than 96x96 pixels, else `large_resolution`."""
    return SMALL_IMAGE_RESOLUTION if median_image_area < SMALL_IMAGE_AREA else tuple(large_resolution)


def learning_rate_multiplier(
    step: int, *, warmup_steps: int, decay_steps: Sequence[int], decay_factor: float
) -> float:
    """The HyperRule schedule as a multiple of the base rate at optimizer step `step` (0-based).

    Linear warmup from 0 over `warmup_steps`, then constant, times `decay_factor` after each decay step.
    """
    if step < warmup_steps:
        return step / warmup_steps
    return decay_factor ** sum(step >= boundary for boundary in decay_steps)


# Fields of the record, in the order `bit_hyperrule.json` lists them.
RECORD_FIELDS = (
    "dataset_size",
    "median_image_area",
    "precrop",
    "crop",
    "steps",
    "warmup_steps",
    "decay_steps",
    "mixup_alpha",
    "learning_rate",
    "batch_size",
    "micro_batch_size",
)
# The training augmentation (§2.2): random crop and random horizontal flip, both on unless a task's labels
# forbid them (Appendix B); recorded in `bit_hyperrule.json` after the fields above.
AUGMENTATION_FIELDS = ("random_crop", "horizontal_flip")
# Fields that can be overridden: the record's, the augmentation switches and SGD's constants.
OVERRIDABLE_FIELDS = (*RECORD_FIELDS, *AUGMENTATION_FIELDS, "momentum", "weight_decay")


def _warmup_steps(value: float, steps: int) -> int:
    """A number of warmup steps, or (below 1, as the Trainer's `warmup_steps` reads it) a fraction of the steps."""
    return round(value * steps) if 0 < value < 1 else int(value)


def variant_schedule(variant: str, regime: str, steps: int) -> tuple[int, tuple[int, ...]]:
    """(warmup steps, decay steps) of a rule variant for a run of `steps` steps in `regime`.

    A run shorter or longer than the regime's own keeps the variant's shape: the warmup and the decays stay at
    the same fractions of the run.
    """
    scale = steps / STEPS[regime]
    if variant == RELEASED:
        warmup, *decays, _end = RELEASED_SCHEDULES[regime]
        return round(warmup * scale), tuple(max(1, round(boundary * scale)) for boundary in decays)
    return round(WARMUP_STEPS[regime] * scale), tuple(max(1, round(fraction * steps)) for fraction in DECAY_FRACTIONS)


@dataclasses.dataclass(frozen=True)
class BitHyperRule:
    """The BiT-HyperRule fine-tuning setting for one dataset.

    Build it with `from_dataset`; `overrides` names the fields that were given rather than derived.
    `micro_batch_size` is None until a device is chosen (`for_device` or `with_micro_batch_size`), which also
    records the number of `processes` the batch is split across.
    """

    dataset_size: int
    median_image_area: float
    precrop: int
    crop: int
    steps: int
    warmup_steps: int
    decay_steps: tuple[int, ...]
    mixup_alpha: float
    learning_rate: float
    batch_size: int
    micro_batch_size: int | None = None
    random_crop: bool = True
    horizontal_flip: bool = True
    momentum: float = SGD_MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    decay_factor: float = DECAY_FACTOR
    variant: str = PAPER
    processes: int = 1
    overrides: tuple[str, ...] = ()
    learning_rate_reason: str = ""

    @classmethod
    def from_dataset(
        cls,
        num_examples: int,
        median_area: float,
        *,
        variant: str = PAPER,
        large_resolution: tuple[int, int] | None = None,
        task_augmentation: dict[str, bool] | None = None,
        **overrides,
    ) -> BitHyperRule:
        """The rule for a training set of `num_examples` examples whose median image area is `median_area`.

        `variant` is "paper" or "released" (see the module docstring); `large_resolution` replaces the variant's
        (precrop, crop) for large images. `task_augmentation` ({"random_crop": False, "horizontal_flip": False})
        is what the task's labels allow (paper Appendix B): part of the rule, not an override. `overrides` are fields
        of the rule (`steps=100`, `precrop=40`,
        `crop=32`, `batch_size=64`, ...); None values are ignored. Derived fields follow the overridden ones:
        with `steps` overridden the warmup and the decays keep the variant's fractions of the schedule; with
        `batch_size` overridden and no `learning_rate`, the rate is scaled linearly with the batch.
        """
        if variant not in HYPERRULE_VARIANTS:
            raise FinetuneInputError(f"hyperrule={variant!r}: expected one of {', '.join(HYPERRULE_VARIANTS)}.")
        unknown = sorted(set(overrides) - set(OVERRIDABLE_FIELDS))
        if unknown:
            raise FinetuneInputError(
                f"Unknown BiT-HyperRule fields {unknown}; the fields are {list(OVERRIDABLE_FIELDS)}."
            )
        given = {name: value for name, value in overrides.items() if value is not None}
        dataset_size = int(given.get("dataset_size", num_examples))
        median_image_area = float(given.get("median_image_area", median_area))
        if dataset_size < 1:
            raise FinetuneInputError(f"dataset_size={dataset_size}: the training set is empty.")
        regime = task_regime(dataset_size)
        if large_resolution is None:
            large_resolution = LARGE_IMAGE_RESOLUTION_BIT_L if variant == RELEASED else LARGE_IMAGE_RESOLUTION
        precrop, crop = resolution_for_area(median_image_area, large_resolution)
        steps = int(given.get("steps", STEPS[regime]))
        if steps < 1:
            raise FinetuneInputError(f"steps={steps}: expected a positive integer.")
        warmup_steps, decay_steps = variant_schedule(variant, regime, steps)
        batch_size = int(given.get("batch_size", BATCH_SIZE))
        if "learning_rate" in given:
            learning_rate = float(given["learning_rate"])
            reason = f"{learning_rate:g}, given (the rule's is {LEARNING_RATE:g} at batch {BATCH_SIZE})"
        elif batch_size != LEARNING_RATE_REFERENCE_BATCH:
            learning_rate = LEARNING_RATE * batch_size / LEARNING_RATE_REFERENCE_BATCH
            reason = (
                f"{learning_rate:g} = {LEARNING_RATE:g} x {batch_size}/{LEARNING_RATE_REFERENCE_BATCH}: the rule's "
                f"rate is for batch {LEARNING_RATE_REFERENCE_BATCH}; scaled linearly with the batch as the BiT paper "
                "scales its upstream learning rate with batch size (§3.3, after Goyal et al.)"
            )
        else:
            learning_rate = LEARNING_RATE
            reason = f"{LEARNING_RATE:g}, the rule's (BiT paper §2.2 Table 1)"
        rule = cls(
            dataset_size=dataset_size,
            median_image_area=median_image_area,
            precrop=int(given.get("precrop", precrop)),
            crop=int(given.get("crop", crop)),
            steps=steps,
            warmup_steps=_warmup_steps(given.get("warmup_steps", warmup_steps), steps),
            decay_steps=tuple(int(step) for step in given.get("decay_steps", decay_steps)),
            mixup_alpha=float(given.get("mixup_alpha", MIXUP_ALPHA if dataset_size >= MIXUP_MIN_EXAMPLES else 0.0)),
            learning_rate=learning_rate,
            batch_size=batch_size,
            micro_batch_size=int(given["micro_batch_size"]) if "micro_batch_size" in given else None,
            random_crop=bool(given.get("random_crop", (task_augmentation or {}).get("random_crop", True))),
            horizontal_flip=bool(given.get("horizontal_flip", (task_augmentation or {}).get("horizontal_flip", True))),
            momentum=float(given.get("momentum", SGD_MOMENTUM)),
            weight_decay=float(given.get("weight_decay", WEIGHT_DECAY)),
            variant=variant,
            overrides=tuple(name for name in OVERRIDABLE_FIELDS if name in given),
            learning_rate_reason=reason,
        )
        rule.validate()
        return rule

    def validate(self) -> None:
        """Raise `FinetuneInputError` naming the first field whose value cannot be trained with."""
        for name in ("precrop", "crop", "steps", "batch_size", "processes"):
            if getattr(self, name) < 1:
                raise FinetuneInputError(f"{name}={getattr(self, name)}: expected a positive integer.")
        if self.crop < MIN_IMAGE_SIZE:
            raise FinetuneInputError(
                f"crop={self.crop}: expected at least {MIN_IMAGE_SIZE} pixels (BiT downsamples by 32)."
            )
        if self.crop > self.precrop:
            raise FinetuneInputError(
                f"crop={self.crop} is larger than precrop={self.precrop}: the crop is taken from the resized image."
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise FinetuneInputError(
                f"warmup_steps={self.warmup_steps}: expected 0 <= warmup_steps < steps={self.steps}."
            )
        if list(self.decay_steps) != sorted(self.decay_steps) or any(
            not 0 < s <= self.steps for s in self.decay_steps
        ):
            raise FinetuneInputError(
                f"decay_steps={list(self.decay_steps)}: expected increasing steps in (0, {self.steps}]."
            )
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise FinetuneInputError(
                f"momentum={self.momentum}, weight_decay={self.weight_decay}: expected 0 <= momentum < 1, "
                "weight_decay >= 0."
            )
        if self.mixup_alpha < 0:
            raise FinetuneInputError(f"mixup_alpha={self.mixup_alpha}: expected >= 0 (0 turns MixUp off).")
        if not self.learning_rate > 0:
            raise FinetuneInputError(f"learning_rate={self.learning_rate}: expected > 0.")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise FinetuneInputError(
                f"micro_batch_size={self.micro_batch_size}: expected 1 <= micro_batch_size <= "
                f"batch_size={self.batch_size}."
            )

    @property
    def regime(self) -> str:
        return task_regime(self.dataset_size)

    def with_micro_batch_size(self, micro_batch_size: int, processes: int = 1) -> BitHyperRule:
        """This rule with a chosen micro-batch on each of `processes` processes (not an override: the effective
        batch is unchanged); a batch the micro-batches cannot make is refused."""
        rule = dataclasses.replace(self, micro_batch_size=int(micro_batch_size), processes=int(processes))
        rule.validate()
        rule.gradient_accumulation_steps()
        return rule

    def for_device(self, model: torch.nn.Module, device: torch.device | str, processes: int = 1) -> BitHyperRule:
        """This rule on `processes` processes of `device`: the given micro-batch, or the largest divisor of
        the per-process batch whose training step of `model` fits the device (`choose_micro_batch_size`)."""
        micro = self.micro_batch_size
        if micro is None:
            micro = choose_micro_batch_size(model, self.crop, self.batch_size, device, world_size=processes)
        return self.with_micro_batch_size(micro, processes)

    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each of the `processes` processes, so the batch is `batch_size`."""
        if self.micro_batch_size is None:
            raise FinetuneInputError("The micro-batch size is not chosen yet (BitHyperRule.for_device).")
        per_step = self.micro_batch_size * self.processes
        if self.batch_size % per_step:
            raise FinetuneInputError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size} x "
                f"{self.processes} process(es); choose a micro-batch that divides "
                f"{self.batch_size // math.gcd(self.batch_size, self.processes)}."
            )
        return self.batch_size // per_step

    def to_dict(self) -> dict:
        """The `bit_hyperrule.json` record: the named fields, the augmentation, SGD's constants, the variant,
        how the batch is split (once the micro-batch is chosen) and the overridden names."""
        record = {name: getattr(self, name) for name in RECORD_FIELDS}
        record["decay_steps"] = list(self.decay_steps)
        for name in AUGMENTATION_FIELDS:
            record[name] = getattr(self, name)
        record["momentum"] = self.momentum
        record["weight_decay"] = self.weight_decay
        record["hyperrule"] = self.variant
        if self.micro_batch_size is not None:
            record["processes"] = self.processes
            record["gradient_accumulation_steps"] = self.gradient_accumulation_steps()
        record["overrides"] = list(self.overrides)
        return record

    def save(self, folder: str | os.PathLike) -> Path:
        return atomic_write_json(Path(folder) / HYPERRULE_FILE, self.to_dict())

    def differences_from(self, reference: BitHyperRule) -> dict[str, tuple]:
        """{field: (this value, reference value)} for the record fields that differ."""
        mine, theirs = self.to_dict(), reference.to_dict()
        fields = (*RECORD_FIELDS, *AUGMENTATION_FIELDS)
        return {name: (mine[name], theirs[name]) for name in fields if mine[name] != theirs[name]}

    def describe(self) -> str:
        """Human-readable summary, one line per decision, overridden fields marked."""

        def mark(*names):
            if any(name in self.overrides for name in names):
                return " (override)"
            if any(name in AUGMENTATION_FIELDS and not getattr(self, name) for name in names):
                return " (the task's labels, paper Appendix B)"
            return ""

        area_side = "<" if self.median_image_area < SMALL_IMAGE_AREA else ">="
        lines = [
            f"BiT-HyperRule ({self.variant}) for {self.dataset_size:,} training examples ({self.regime} task), "
            f"median image area {self.median_image_area:,.0f} px ({area_side} 96x96):",
            (
                f"  resolution  resize {self.precrop}, random crop {self.crop}; test: resize {self.crop}"
                if self.random_crop
                else f"  resolution  resize {self.crop}, no random crop{mark('random_crop')}; test: resize {self.crop}"
            )
            + mark("precrop", "crop"),
            "  flip        "
            + ("random horizontal flip" if self.horizontal_flip else "no random flip")
            + mark("horizontal_flip"),
            f"  schedule    {self.steps} steps{mark('steps')}, linear warmup {self.warmup_steps}{mark('warmup_steps')}, "
            f"lr x{self.decay_factor:g} at steps {list(self.decay_steps)}{mark('decay_steps')}",
            f"  optimizer   SGD momentum {self.momentum:g}{mark('momentum')}, "
            + (f"weight decay {self.weight_decay:g}{mark('weight_decay')}" if self.weight_decay else "no weight decay")
            + f", learning rate {self.learning_rate_reason}",
            "  MixUp       "
            + (f"alpha {self.mixup_alpha:g}" if self.mixup_alpha > 0 else "off")
            + mark("mixup_alpha"),
        ]
        batch = f"  batch       {self.batch_size}{mark('batch_size')}"
        if self.micro_batch_size is not None:
            processes = f" x {self.processes} processes" if self.processes > 1 else ""
            batch += (
                f" = micro-batch {self.micro_batch_size}{mark('micro_batch_size')}{processes} x "
                f"{self.gradient_accumulation_steps()} accumulation step(s)"
            )
        lines.append(batch)
        return "\n".join(lines)


# --- Micro-batch: gradient accumulation keeps the batch when the device cannot hold it -------------

# Share of the free device memory the training activations may use (the rest: data workers, allocator
# slack, the evaluation pass).
MEMORY_BUDGET_FRACTION = 0.5
# Backward holds gradients of the activations next to the saved activations.
BACKWARD_ACTIVATION_FACTOR = 2
# Weights, their gradients and SGD's momentum buffer.
OPTIMIZER_COPIES_OF_WEIGHTS = 3
# Models whose training memory cannot be measured on the meta device get this micro-batch.
FALLBACK_MICRO_BATCH_SIZE = 32


def available_memory_bytes(device: torch.device | str) -> int:
    """Free memory on `device`: CUDA's free memory, else the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    meminfo = Path("/proc/meminfo")  # Linux: counts reclaimable caches, unlike the free pages below
    lines = meminfo.read_text().splitlines() if meminfo.is_file() else []
    available = [int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")]
    return available[0] if available else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def training_memory_per_example(model: torch.nn.Module, resolution: int) -> tuple[int, int]:
    """(bytes per example, fixed bytes) that a training step of `model` at `resolution` saves for backward.

    Measured on the meta device (nothing allocated): the tensors autograd saves for a batch of 1 and of
    2 images; the difference is per example, the rest (e.g. standardized weights) is fixed. The measurement
    depends only on the architecture and the resolution, so it is made once per pair.
    """
    return _saved_activation_bytes(type(model), model.config.to_json_string(use_diff=False), resolution)


@functools.cache
def _saved_activation_bytes(model_class: type, config_json: str, resolution: int) -> tuple[int, int]:
    config = model_class.config_class.from_dict(json.loads(config_json))

    def saved_bytes(batch: int) -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.device("meta"):
            probe = model_class(config).train()
            pixel_values = torch.empty(batch, 3, resolution, resolution)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            probe(pixel_values=pixel_values).logits.sum()
        return total

    one, two = saved_bytes(1), saved_bytes(2)
    return two - one, max(one - (two - one), 0)


def choose_micro_batch_size(
    model: torch.nn.Module,
    resolution: int,
    batch_size: int,
    device: torch.device | str,
    *,
    world_size: int = 1,
    available_bytes: int | None = None,
) -> int:
    """The largest divisor of the per-process batch whose training step fits the device.

    Any divisor, not only powers of two: a batch of 96 that fits is one micro-batch of 96, not 3 of 32
    (bigger micro-batches run faster and give MixUp more partners). `available_bytes` defaults to the
    device's free memory; `MEMORY_BUDGET_FRACTION` of it is used.
    """
    if batch_size % world_size:
        raise FinetuneInputError(f"batch_size={batch_size} is not divisible by the {world_size} processes.")
    per_process = batch_size // world_size
    try:
        per_example, fixed = training_memory_per_example(model, resolution)
    except Exception as error:  # a model that cannot be built on the meta device: measure nothing
        logger.warning(
            "Could not measure the training memory of %s (%s); micro-batch %d.",
            type(model).__name__,
            error,
            FALLBACK_MICRO_BATCH_SIZE,
        )
        return math.gcd(per_process, FALLBACK_MICRO_BATCH_SIZE)
    if available_bytes is None:
        available_bytes = available_memory_bytes(device)
    weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    budget = MEMORY_BUDGET_FRACTION * available_bytes - OPTIMIZER_COPIES_OF_WEIGHTS * weights - fixed
    divisors = [size for size in range(per_process, 0, -1) if per_process % size == 0]
    return next((size for size in divisors if size * per_example * BACKWARD_ACTIVATION_FACTOR <= budget), 1)


def mixup_micro_batch_warning(mixup_alpha: float, micro_batch_size: int) -> str | None:
    """Why MixUp would do nothing, or None. MixUp pairs images inside a micro-batch (the forward pass
    sees one micro-batch at a time); a micro-batch of one image can only be mixed with itself."""
    if mixup_alpha > 0 and micro_batch_size < 2:
        return (
            f"MixUp (alpha {mixup_alpha:g}) pairs the images of a micro-batch, and the micro-batch is 1 image: "
            "every image would be mixed with itself, so MixUp has no effect. Give --micro-batch-size 2 or more "
            "(gradient accumulation keeps the batch) or --mixup-alpha 0."
        )
    return None
