"""The two regularisers of the paper's random search (§4.4, Appendix A; docs/recipe.md "BiT-HyperRule", random
search): dropout on the pre-logits and weight decay toward the initial weights. BiT-HyperRule uses neither.

- `PreLogitsDropout`: dropout on the classifier's input (the pooled pre-logits, the "penultimate layer"), as a
  forward pre-hook on `model.classifier`: the network and its saved folder are unchanged (stock transformers loads
  it as it is) and evaluation, in eval mode, is unaffected.
- `InitialWeightDecay`: the penalty (strength / 2) * ||w - w_0||^2 summed over the trainable parameters, where w_0
  are the weights fine-tuning started from (the pre-trained backbone and the zero head), added as its exact
  gradient strength * (w - w_0) to every parameter's gradient just before each optimizer step (an optimizer step
  pre-hook: once per step whatever the gradient accumulation, after mixed precision's unscaling and data
  parallel's all-reduce, and never in the logged loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A dropout rate must be below 1 (a rate of 1 would drop every pre-logit); Appendix A searches [0, 0.7].
MAX_DROPOUT = 1.0


class PreLogitsDropout:
    """Dropout with rate `rate` on the input of `model.classifier` while the model is in training mode."""

    def __init__(self, model: torch.nn.Module, rate: float):
        if not 0 <= rate < MAX_DROPOUT:
            raise ValueError(f"pre-logits dropout {rate}: expected a rate in [0, 1).")
        classifier = getattr(model, "classifier", None)
        if classifier is None:
            raise ValueError(
                f"{type(model).__name__} has no `classifier` whose input (the pre-logits) could be dropped."
            )
        self.rate = float(rate)
        self.handle = classifier.register_forward_pre_hook(self._drop)

    def _drop(self, module: torch.nn.Module, inputs: tuple):
        return (F.dropout(inputs[0], self.rate, training=module.training), *inputs[1:])

    def remove(self) -> None:
        self.handle.remove()


class InitialWeightDecay:
    """Adds strength * (w - w_0) to the gradient of every trainable parameter before each optimizer step.

    `w_0` is captured at construction: build it from the model as fine-tuning starts (before a checkpoint is
    resumed into it), so a resumed run decays toward the same weights as an uninterrupted one."""

    def __init__(self, model: torch.nn.Module, strength: float):
        if strength < 0:
            raise ValueError(f"decay toward the initial weights {strength}: expected >= 0.")
        self.strength = float(strength)
        self.initial = {
            parameter: parameter.detach().clone() for parameter in model.parameters() if parameter.requires_grad
        }
        self.handle = None

    def add_to_gradients(self) -> None:
        if self.strength == 0:
            return
        with torch.no_grad():
            for parameter, initial in self.initial.items():
                if parameter.grad is not None:
                    parameter.grad.add_(parameter.detach() - initial.to(parameter.device), alpha=self.strength)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply before every step of `optimizer` (the innermost torch optimizer)."""
        self.detach()
        self.handle = optimizer.register_step_pre_hook(lambda *_: self.add_to_gradients())

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def penalty(self) -> torch.Tensor:
        """(strength / 2) * sum ||w - w_0||^2, the loss whose gradient `add_to_gradients` adds."""
        return 0.5 * self.strength * sum(((p - w0.to(p.device)) ** 2).sum() for p, w0 in self.initial.items())
