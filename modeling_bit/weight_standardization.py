"""Weight Standardization, and the cache that computes it once while a convolution's weights do not change.

`standardize_weight` is the arithmetic (docs/recipe.md "Architecture"). `StandardizedWeights` is what a
`WeightStandardizedConv2d` keeps beside its weight: while the weight trains, standardization is part of the graph;
otherwise the standardized kernel is computed once and reused until the weight changes (its version counter,
storage, dtype or device tell), and on CPU without gradients it is also kept prepacked in oneDNN's blocked layout
for the last input shape, so inference skips both the standardization and the reorder. How much that saves is
measured by benchmarks/benchmark_model.py (README, "Speed").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# oneDNN's prepacked convolutions (CPU, float32), where this build of PyTorch has them.
_ONEDNN_PREPACK_AVAILABLE = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
)


def standardize_weight(weight: Tensor, eps: float) -> Tensor:
    """Weight Standardization: each output filter minus its mean, over sqrt(population variance + eps).

    Computed as a group norm with one group per filter over the (in, kh, kw) values: the same arithmetic as
    `(w - mean) / sqrt(var + eps)`, with a fused kernel for forward and backward.
    """
    out_channels = weight.shape[0]
    flat = weight.reshape(1, out_channels, -1)
    return F.group_norm(flat, out_channels, eps=eps).reshape_as(weight)


class StandardizedWeights:
    """The standardized kernel of one convolution: in the graph while its weight trains, else cached."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._kernel: Tensor | None = None
        self._key: tuple | None = None

    def __getstate__(self) -> dict:
        # Derived data (and a oneDNN tensor cannot even be copied or pickled): copies start without it.
        return {"_kernel": None, "_key": None}

    def kernel(self, conv: nn.Conv2d, eps: float) -> Tensor:
        """The standardized kernel of `conv`: computed in the graph while its weight trains, else cached (dense,
        channels-last, which makes oneDNN run the layer channels-last)."""
        weight = conv.weight
        if torch.compiler.is_compiling():
            # Traced graphs (torch.compile, torch.export) have no version counters or data pointers to key a cache on;
            # the compiler can fold the standardization of frozen weights itself.
            return standardize_weight(weight, eps)
        if (weight.requires_grad and torch.is_grad_enabled()) or weight.is_meta or weight.is_inference():
            # Training: part of the graph; no cache, so none holds memory or goes stale. (Inference tensors have no
            # version counter, so a cache of them could not tell changes.)
            self.clear()
            return standardize_weight(weight, eps)
        return self._cached(conv, eps, packed_for_input=None)

    def convolve(self, conv: nn.Conv2d, eps: float, hidden_state: Tensor) -> Tensor:
        """`conv` applied to `hidden_state` with its standardized kernel, prepacked for oneDNN where it can be."""
        if self._can_prepack(conv, hidden_state):
            packed = self._cached(conv, eps, packed_for_input=hidden_state.shape)
            return torch.ops.mkldnn._convolution_pointwise(
                hidden_state, packed, None, conv.padding, conv.stride, conv.dilation, conv.groups, "none", [], ""
            )
        return F.conv2d(
            hidden_state, self.kernel(conv, eps), None, conv.stride, conv.padding, conv.dilation, conv.groups
        )

    def _cached(self, conv: nn.Conv2d, eps: float, packed_for_input: torch.Size | None) -> Tensor:
        weight = conv.weight
        # Any in-place update (optimizer step, load_state_dict, `with no_grad: w.mul_()`) bumps the version counter;
        # a move or dtype change replaces the storage.
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.device, packed_for_input)
        if self._key != key:
            # A normal tensor even under inference_mode, so later autograd use of the cache stays legal.
            with torch.inference_mode(False), torch.no_grad():
                standardized = standardize_weight(weight, eps)
                if packed_for_input is None:
                    self._kernel = standardized.contiguous(memory_format=torch.channels_last)
                else:  # oneDNN's blocked layout for this input shape, reordered once instead of in every call
                    self._kernel = torch._C._nn.mkldnn_reorder_conv2d_weight(
                        standardized.to_mkldnn(),
                        conv.padding,
                        conv.stride,
                        conv.dilation,
                        conv.groups,
                        list(packed_for_input),
                    )
            self._key = key
        return self._kernel

    @staticmethod
    def _can_prepack(conv: nn.Conv2d, hidden_state: Tensor) -> bool:
        weight = conv.weight
        return (
            _ONEDNN_PREPACK_AVAILABLE
            and not torch.compiler.is_compiling()
            and not torch.is_grad_enabled()
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and hidden_state.dtype == torch.float32
            and not weight.is_meta
            and not weight.is_inference()
        )


__all__ = ["StandardizedWeights", "standardize_weight"]
