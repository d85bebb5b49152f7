"""The BiT upstream pre-training recipe: every number in one place, named and sourced.

Sources: docs/recipe.md "Upstream pre-training" and the BiT paper (Kolesnikov et al., "Big Transfer (BiT):
General Visual Representation Learning"), section 3.3 "Upstream Pre-Training" and section 4.2. Every
value here is a default of `pretrain.py` and can be overridden from its command line; the script prints
which values of a run differ from the paper's.
"""

from __future__ import annotations

import dataclasses
import math

from image_data import InputError

# --- Optimisation (paper §3.3; docs/recipe.md "Upstream pre-training") -----------------------------
GLOBAL_BATCH_SIZE = 4096  # §3.3: "We use a global batch size of 4096" (8 images per TPUv3 chip on 512 chips)
BASE_LEARNING_RATE = 0.03  # §3.3: initial learning rate 0.03 ...
BASE_LEARNING_RATE_BATCH_SIZE = 256  # ... scaled "multiplicatively by batch size / 256"
WARMUP_STEPS = 5000  # §3.3: "linear learning rate warmup for 5000 optimization steps"
# BiT-M's run, which that warmup belongs to: 90 epochs (§3.3) of ImageNet-21k's 14,197,122 images (§3.1: "14.2M
# images", the fall 2011 release) at the global batch of 4096.
IMAGENET_21K_EXAMPLES = 14_197_122
BIT_M_STEPS = round(90 * IMAGENET_21K_EXAMPLES / GLOBAL_BATCH_SIZE)  # 311,948
# A shorter run keeps the warmup's share of BiT-M's run (5,000 of 311,948 steps, 1.6 %), as it keeps the decays'.
WARMUP_FRACTION = WARMUP_STEPS / BIT_M_STEPS
MOMENTUM = 0.9  # docs/recipe.md "Upstream pre-training": SGD with momentum 0.9, no adaptive optimizer
WEIGHT_DECAY = 1e-4  # §4.2: "we use the standard weight decay of 1e-4"; lower looks faster, ends worse
LEARNING_RATE_DECAY_FACTOR = 0.1  # §3.3: "decay the learning rate by a factor of 10"


@dataclasses.dataclass(frozen=True)
class UpstreamSchedule:
    """Training length and the epochs after which the learning rate is multiplied by the decay factor."""

    epochs: float
    decay_epochs: tuple[float, ...]


# §3.3: "We train both BiT-S and BiT-M for 90 epochs and decay the learning rate by a factor of 10 at 30, 60
# and 80 epochs. For BiT-L, we train for 40 epochs ... and decay the learning rate after 10, 23, 30 and 37."
SCHEDULES = {
    "bit-s": UpstreamSchedule(epochs=90, decay_epochs=(30, 60, 80)),
    "bit-m": UpstreamSchedule(epochs=90, decay_epochs=(30, 60, 80)),
    "bit-l": UpstreamSchedule(epochs=40, decay_epochs=(10, 23, 30, 37)),
}
DEFAULT_SCHEDULE = "bit-m"

# --- Input pipeline ---------------------------------------------------------------------------------
# §3.3: the standard upstream input pipeline, an inception-style random crop at 224 + flip; input in [-1, 1]
# (docs/recipe.md "Architecture").
IMAGE_SIZE = 224
# "Inception-style" crop (Szegedy et al., "Going deeper with convolutions", 2015 — the standard ImageNet
# training crop the BiT upstream pipeline uses): a random box covering 8%-100% of the image area with
# aspect ratio between 3/4 and 4/3, resized to the training resolution.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # tries at sampling a box that fits before falling back to the whole image's centre
HORIZONTAL_FLIP_PROBABILITY = 0.5

# --- Loss -------------------------------------------------------------------------------------------
# docs/recipe.md "Upstream pre-training": JFT-300M is multi-label, trained with a per-class sigmoid loss; public
# successors start the head bias negative (-10) so that with thousands of classes every class starts at p ~ 4.5e-5 and the initial
# loss is about the number of positive labels per image times 10, not thousands times log 2.
MULTI_LABEL_HEAD_BIAS = -10.0


@dataclasses.dataclass
class Recipe:
    """The values one run uses. Defaults are the paper's; the script overrides them from its flags."""

    global_batch_size: int = GLOBAL_BATCH_SIZE
    base_learning_rate: float = BASE_LEARNING_RATE
    base_learning_rate_batch_size: int = BASE_LEARNING_RATE_BATCH_SIZE
    warmup_steps: int = WARMUP_STEPS
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    learning_rate_decay_factor: float = LEARNING_RATE_DECAY_FACTOR
    schedule: str = DEFAULT_SCHEDULE
    epochs: float = SCHEDULES[DEFAULT_SCHEDULE].epochs
    decay_epochs: tuple[float, ...] = SCHEDULES[DEFAULT_SCHEDULE].decay_epochs
    image_size: int = IMAGE_SIZE
    crop_area_range: tuple[float, float] = CROP_AREA_RANGE
    crop_aspect_ratio_range: tuple[float, float] = CROP_ASPECT_RATIO_RANGE
    horizontal_flip_probability: float = HORIZONTAL_FLIP_PROBABILITY
    multi_label_head_bias: float = MULTI_LABEL_HEAD_BIAS

    @property
    def peak_learning_rate(self) -> float:
        """0.03 x global batch / 256 (§3.3); 0.48 at the paper's batch of 4096."""
        return self.base_learning_rate * self.global_batch_size / self.base_learning_rate_batch_size

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["peak_learning_rate"] = self.peak_learning_rate
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}

    def differences_from_paper(self) -> list[str]:
        """One line per value that differs from the paper's recipe for this schedule (empty if none)."""
        paper = Recipe(schedule=self.schedule, **_schedule_fields(self.schedule))
        differences = []
        for field in dataclasses.fields(self):
            ours, theirs = getattr(self, field.name), getattr(paper, field.name)
            if _differs(ours, theirs):
                differences.append(f"{field.name}: {_show(ours)} (paper: {_show(theirs)})")
        return differences


def _schedule_fields(schedule: str) -> dict:
    upstream = SCHEDULES[schedule]
    return {"epochs": upstream.epochs, "decay_epochs": upstream.decay_epochs}


def recipe_for_schedule(schedule: str, **overrides) -> Recipe:
    """The paper's recipe for `schedule` ("bit-s", "bit-m", "bit-l") with `overrides` (None = keep) applied.

    Overriding `epochs` without `decay_epochs` moves the decays with it (BiT-M at 9 epochs decays at 3, 6, 8).
    """
    if schedule not in SCHEDULES:
        raise InputError(f"Unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}.")
    overrides = {key: value for key, value in overrides.items() if value is not None}
    fields = {**_schedule_fields(schedule), **overrides}
    if "epochs" in overrides and "decay_epochs" not in overrides:
        # A shorter or longer run keeps the schedule's shape: decays at the same fractions of training.
        paper = SCHEDULES[schedule]
        fields["decay_epochs"] = tuple(epoch * overrides["epochs"] / paper.epochs for epoch in paper.decay_epochs)
    for key in ("decay_epochs", "crop_area_range", "crop_aspect_ratio_range"):
        if key in fields:
            fields[key] = tuple(float(value) for value in fields[key])
    return Recipe(schedule=schedule, **fields)


def _differs(ours, theirs) -> bool:
    if isinstance(ours, (tuple, list)):
        return len(ours) != len(theirs) or any(_differs(a, b) for a, b in zip(ours, theirs))
    if isinstance(ours, float) or isinstance(theirs, float):
        return not math.isclose(float(ours), float(theirs), rel_tol=1e-9)
    return ours != theirs


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_show(item) for item in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class LearningRateSchedule:
    """Linear warmup to the peak, then staircase decays: the learning rate of every optimizer step.

    `learning_rate(step)` is the rate used by update number `step` (0-based): `peak * (step + 1) / warmup`
    during warmup (so the first update is not wasted and update `warmup - 1` runs at the peak), then
    `peak * factor ** k` once `k` decay boundaries (in steps) are at or before `step`.
    """

    peak_learning_rate: float
    warmup_steps: int
    decay_steps: tuple[int, ...]
    decay_factor: float
    total_steps: int

    def learning_rate(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        decays = sum(1 for boundary in self.decay_steps if step >= boundary)
        return self.peak_learning_rate * warmup * self.decay_factor**decays


def build_schedule(recipe: Recipe, num_examples: int | None, max_steps: int | None) -> LearningRateSchedule:
    """Convert the recipe's epochs into optimizer steps for a dataset of `num_examples`.

    Without `max_steps` the run lasts `recipe.epochs` epochs and decays after `recipe.decay_epochs` epochs,
    converted with steps per epoch = num_examples / global batch. With `max_steps` the run lasts that many
    steps and the decays keep their place relative to the schedule's length (BiT-M's 30/60/80 of 90 become
    1/3, 2/3 and 8/9 of `max_steps`), so a short run still has the recipe's shape.
    """
    if max_steps is not None:
        if max_steps < 1:
            raise InputError(f"max_steps must be at least 1, got {max_steps}.")
        total_steps = int(max_steps)
        decay_steps = tuple(round(total_steps * epoch / recipe.epochs) for epoch in recipe.decay_epochs)
    else:
        if not num_examples:
            raise InputError(
                "The length of a run in epochs needs the number of training examples, which a streaming dataset "
                "does not know: pass --max-steps, or --num-train-examples."
            )
        steps_per_epoch = num_examples / recipe.global_batch_size
        total_steps = max(1, round(recipe.epochs * steps_per_epoch))
        decay_steps = tuple(round(epoch * steps_per_epoch) for epoch in recipe.decay_epochs)
    return LearningRateSchedule(
        peak_learning_rate=recipe.peak_learning_rate,
        warmup_steps=recipe.warmup_steps,
        decay_steps=decay_steps,
        decay_factor=recipe.learning_rate_decay_factor,
        total_steps=total_steps,
    )


def scaled_warmup_steps(total_steps: int) -> int:
    """The paper's warmup at the share of this run it has of BiT-M's: round(5000 x min(1, steps / 311,948))."""
    return round(WARMUP_STEPS * min(1.0, total_steps / BIT_M_STEPS))


@dataclasses.dataclass(frozen=True)
class RunSchedule:
    """A run's recipe (with the warmup it uses), its learning rate by step, and why the warmup is what it is."""

    recipe: Recipe
    schedule: LearningRateSchedule
    warmup_note: str | None  # set when the warmup was scaled with the run

    def warmup_record(self) -> dict:
        """For bit_pretraining.json: the warmup, the paper's, and whether (and why) it was scaled."""
        return {
            "steps": self.recipe.warmup_steps,
            "paper_steps": WARMUP_STEPS,
            "scaled_with_the_run": self.warmup_note is not None,
            "why": self.warmup_note,
        }


def schedule_for_run(
    recipe: Recipe, num_examples: int | None, max_steps: int | None, *, warmup_given: bool, length_given: bool
) -> RunSchedule:
    """The run's schedule (`build_schedule`) with its warmup decided.

    A run whose length is given (`--max-steps`, `--epochs`) without `--warmup-steps` keeps the warmup's share
    of BiT-M's run, as it keeps the decays' (BiT-M warms up for 5,000 of its 311,948 steps: a 400-step run
    for 6), so a short run reaches its peak learning rate. A warmup at least as long as the run (which would
    never reach the peak) is refused.
    """
    schedule = build_schedule(recipe, num_examples, max_steps)
    total, note = schedule.total_steps, None
    if length_given and not warmup_given:
        warmup = scaled_warmup_steps(total)
        if warmup != recipe.warmup_steps:
            recipe = dataclasses.replace(recipe, warmup_steps=warmup)
            schedule = dataclasses.replace(schedule, warmup_steps=warmup)
            note = (
                f"warmup: {warmup} steps, the paper's {WARMUP_STEPS} scaled with the run as the decays are (BiT-M "
                f"warms up for {WARMUP_FRACTION:.1%} of its {BIT_M_STEPS:,} steps, and so does this run of {total:,}); "
                "--warmup-steps sets it"
            )
    if 0 < recipe.warmup_steps >= total:
        if warmup_given:
            raise InputError(
                f"--warmup-steps {recipe.warmup_steps} is at least the run's {total} steps: the learning rate would "
                f"never reach its peak. Give fewer (BiT-M's share, {WARMUP_FRACTION:.1%}, is "
                f"{scaled_warmup_steps(total)} here) or a longer run."
            )
        raise InputError(
            f"The paper's {recipe.warmup_steps}-step warmup is at least this run's {total} steps "
            f"({recipe.epochs:g} epochs of {num_examples} examples at a global batch of {recipe.global_batch_size}): "
            "pass --max-steps or --epochs (the warmup then scales with the run), or --warmup-steps."
        )
    return RunSchedule(recipe, schedule, note)


def gradient_accumulation_steps(global_batch_size: int, per_device_batch_size: int, num_processes: int) -> int:
    """global batch = per-device batch x processes x accumulation; raise if that has no integer solution."""
    per_step = per_device_batch_size * num_processes
    if per_device_batch_size < 1 or global_batch_size < 1:
        raise InputError(
            f"Batch sizes must be positive, got global {global_batch_size} and per-device {per_device_batch_size}."
        )
    if global_batch_size % per_step:
        divisors = [b for b in range(1, per_device_batch_size + 1) if global_batch_size % (b * num_processes) == 0]
        hint = f" e.g. --per-device-batch-size {divisors[-1]}" if divisors else ""
        raise InputError(
            f"The global batch size {global_batch_size} is not a multiple of per-device batch "
            f"{per_device_batch_size} x {num_processes} process(es) = {per_step}: choose a per-device batch size "
            f"that divides {global_batch_size} / {num_processes}{hint}, or another global batch size."
        )
    return global_batch_size // per_step


# --- Few-shot linear probe (evaluation while pre-training; paper §3.5 and §4.2) ------------------------------
# The paper's few-shot protocol (docs/recipe.md, "Few-shot"): k examples per class drawn at random, balanced;
# 5 random subsets, median.
FEW_SHOT_EXAMPLES_PER_CLASS = (1, 5, 10)
FEW_SHOT_TRIALS = 5
# Closed-form ridge regression on L2-normalised, centred pre-logits onto +-1 one-hot targets. The strength
# is ours (not from the paper): with unit-norm features it is a mild prior that keeps 1-shot fits stable.
PROBE_RIDGE = 1e-2
# Ours: a k-shot figure is reported only when its fits are tested on at least this many held-out images; with
# fewer, one image moves the accuracy by more than ten points and the figure says nothing about the weights.
PROBE_MIN_TEST_EXAMPLES = 10
