"""The held-out set and the few-shot probe that pre-training runs on it every --probe-every steps.

The probe is a function of the weights and the seed only: however many processes share the evaluation,
every example is evaluated in the same batch (consecutive chunks of the held-out set, dealt to the
processes in turn), and the gathered rows are put back in the held-out set's order before the probe
draws its k-shot subsets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_bit.file_utils import atomic_write_json

from .data import BatchBuilder, UpstreamData
from .probe import few_shot_probe
from .recipe import FEW_SHOT_EXAMPLES_PER_CLASS, PROBE_MIN_TEST_EXAMPLES
from .training import upstream_loss


def choose_held_out(source: UpstreamData, per_class: int, classes: int, scan_limit: int) -> list:
    """(example, key) items of the held-out set, from at most `scan_limit` examples of a streamed split.

    The `classes` best-populated classes (ties: lowest id), up to `per_class` examples each; for multi-label
    data, the examples with exactly one label.
    """
    if source.validation is None:
        return []
    if source.streaming:
        examples = list(source.validation.take(scan_limit))
        labels = [example[source.label_column] for example in examples]
    else:
        examples, labels = None, source.validation[source.label_column]
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        if source.labels.multi_label:
            if len(label) != 1:
                continue
            label = label[0]
        by_class.setdefault(int(label), []).append(index)
    ranked = sorted(by_class, key=lambda c: (-len(by_class[c]), c))[:classes]
    chosen = [index for c in sorted(ranked) for index in by_class[c][:per_class]]
    if examples is None:
        return [(example, (index,)) for index, example in zip(chosen, source.validation.select(chosen))]
    return [(examples[index], (index,)) for index in chosen]


class HeldOutSet:
    """Decoded held-out examples for the few-shot probe and the held-out loss, shared between processes.

    The set is cut into consecutive chunks of `batch_size` examples; process r evaluates chunks r, r + P, ...
    (a process left without one evaluates a copy of the first, which is dropped). Each row keeps its position
    in the set, so the gathered results are put back in order.
    """

    def __init__(
        self,
        source: UpstreamData,
        builder: BatchBuilder,
        accelerator,
        per_class: int,
        classes: int,
        batch_size: int,
        scan_limit: int,
    ):
        self.accelerator = accelerator
        items = choose_held_out(source, per_class, classes, scan_limit)
        self.size = len(items)
        labels = [example[source.label_column] for example, _ in items]
        self.num_classes = len({int(label[0]) if source.labels.multi_label else int(label) for label in labels})
        chunks = range(0, self.size, batch_size)
        rounds = math.ceil(len(chunks) / accelerator.num_processes)
        mine = chunks[accelerator.process_index :: accelerator.num_processes]
        self.batches = []  # (pixels as uint8, labels, position in the set or -1: an unreadable or stand-in row)
        for index in range(rounds):
            stand_in = index >= len(mine)
            start = 0 if stand_in else mine[index]
            chunk = items[start : start + batch_size]
            batch = builder(chunk)
            dropped = (batch["weights"] == 0) | stand_in
            positions = torch.arange(start, start + len(chunk)).masked_fill(dropped, -1)
            # Resized pixels are k / 127.5 - 1 for 8-bit k: stored as uint8, exactly, in a quarter of the memory.
            pixels = ((batch["pixel_values"] + 1) * 127.5).round().to(torch.uint8)
            self.batches.append((pixels, batch["labels"], positions))

    @torch.no_grad()
    def evaluate(self, model, multi_label: bool) -> dict | None:
        """Held-out loss and top-1, and the pre-logits (classifier inputs) of every example in the set's order,
        on every process."""
        if self.size == 0:
            return None
        captured = []
        head = self.accelerator.unwrap_model(model).classifier
        hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].flatten(1).float()))
        was_training = model.training
        model.eval()
        logits = []
        try:
            for pixels, _, _ in self.batches:
                pixel_values = pixels.to(self.accelerator.device).float() / 127.5 - 1
                logits.append(model(pixel_values=pixel_values).logits.float())
        finally:
            hook.remove()
            model.train(was_training)
        device = self.accelerator.device
        local = {
            "logits": torch.cat(logits),
            "labels": torch.cat([labels for _, labels, _ in self.batches]).to(device),
            "positions": torch.cat([positions for _, _, positions in self.batches]).to(device),
            "features": torch.cat(captured),
        }
        gathered = {}
        for name, tensor in local.items():  # the last chunk may be short: pad to the longest, then gather
            padded = self.accelerator.pad_across_processes(tensor, dim=0, pad_index=-1 if name == "positions" else 0)
            gathered[name] = self.accelerator.gather(padded).cpu()
        keep = gathered["positions"] >= 0
        order = gathered["positions"][keep].argsort()
        logits, labels, features = (gathered[name][keep][order] for name in ("logits", "labels", "features"))
        loss = upstream_loss(logits, labels, torch.ones(len(logits)), multi_label).item()
        single = labels.argmax(dim=1) if multi_label else labels
        return {
            "loss": loss,
            "accuracy": float((logits.argmax(dim=1) == single).float().mean()),
            "features": features.numpy(),
            "labels": single.numpy(),
        }


class FewShotProbe:
    """Runs the probe on the held-out set and keeps its results (`O/probe_results.json`, main process)."""

    def __init__(self, held_out: HeldOutSet, accelerator, seed: int, path: Path, start_step: int = 0):
        self.held_out, self.accelerator, self.seed, self.path = held_out, accelerator, seed, path
        # A resumed run keeps the results up to its checkpoint's step (the main process writes the file).
        self.results = []
        if accelerator.is_main_process and start_step > 0 and path.exists():
            self.results = [entry for entry in json.loads(path.read_text()) if entry["step"] <= start_step]

    def describe(self) -> str:
        if self.held_out.size == 0:
            return "No held-out set (no validation split, and --validation-examples 0): no probe."
        return (
            f"Held-out set: {self.held_out.size} images of {self.held_out.num_classes} classes for the few-shot "
            f"probe ({'/'.join(str(k) for k in FEW_SHOT_EXAMPLES_PER_CLASS)} examples per class; a figure needs at "
            f"least {PROBE_MIN_TEST_EXAMPLES} test images)."
        )

    def __call__(self, model, step: int, multi_label: bool) -> dict:
        """Log entries of a probe at `step` (every process takes part; the main process records it)."""
        result = self.held_out.evaluate(model, multi_label)
        if result is None:
            return {}
        metrics = {"heldout_loss": result["loss"], "heldout_accuracy": result["accuracy"]}
        if not self.accelerator.is_main_process:
            return metrics
        entries = few_shot_probe(result["features"], result["labels"], FEW_SHOT_EXAMPLES_PER_CLASS, seed=self.seed)
        for entry in entries:
            self.results.append({"step": step, **entry})
            shot = f"probe_{entry['examples_per_class']}shot"
            metrics[f"{shot}_accuracy"] = entry["accuracy"]
            metrics[f"{shot}_test_examples"] = entry["num_test_examples"]
            metrics["probe_classes"] = entry["num_classes"]  # the same for every k
        atomic_write_json(self.path, self.results)
        shown = ", ".join(
            f"{e['examples_per_class']}-shot {e['accuracy']:.1%} ({e['num_test_examples']} test images)"
            for e in entries
        )
        tqdm.write(
            f"step {step}: few-shot probe {shown or 'not reported (too few held-out images per class)'}"
            + (f" over {entries[0]['num_classes']} classes" if entries else "")
            + f"; held-out loss {result['loss']:.4f}"
        )
        return metrics
