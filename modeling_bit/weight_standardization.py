"""Weight Standardization, and the cache that computes it once while a convolution's weights do not change.

`standardize_weight` is the arithmetic (docs/recipe.md "Architecture"). `StandardizedWeights` is what a
`WeightStandardizedConv2d` keeps beside its weight: while the weight trains, standardization is part of the graph;
otherwise the standardized kernel is computed once and reused until the weight changes (its version counter,
storage, dtype or device tell), and on CPU without gradients it is also kept prepacked in oneDNN's blocked layout
for the last input shape, so inference skips both the standardization and the reorder. Under autocast the cached
kernel is kept in the autocast dtype, which is what the convolution would cast it to in every call. How much that
saves is measured by benchmarks/benchmark_model.py (CPU) and benchmarks/benchmark_gpu.py (README, "Speed").
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
# Devices whose autocast runs convolutions in its lower-precision dtype (so a kernel cached in that dtype is what
# the convolution would have cast it to).
_AUTOCAST_CONVOLUTION_DEVICES = ("cuda", "cpu")


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
        """The standardized kernel of `conv`: computed in the graph while its weight trains, else cached (dense, in
        the layout of `_cached_layout`, and in the autocast dtype under autocast)."""
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
        compute_dtype = None if packed_for_input is not None else _autocast_dtype(weight.device.type)
        # Any in-place update (optimizer step, load_state_dict, `with no_grad: w.mul_()`) bumps the version counter;
        # a move or dtype change replaces the storage.
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.device, packed_for_input, compute_dtype)
        if self._key != key:
            # A normal tensor even under inference_mode, so later autograd use of the cache stays legal.
            with torch.inference_mode(False), torch.no_grad():
                standardized = standardize_weight(weight, eps)
                if packed_for_input is None:
                    kernel = standardized.contiguous(memory_format=_cached_layout(weight))
                    self._kernel = kernel if compute_dtype is None else kernel.to(compute_dtype)
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
            # Autocast asks for convolutions in its dtype, which oneDNN's prepacked float32 kernels would not honour.
            and not torch.is_autocast_enabled("cpu")
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and hidden_state.dtype == torch.float32
            and not weight.is_meta
            and not weight.is_inference()
        )


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs convolutions in on this device type, or None outside autocast."""
    if device_type in _AUTOCAST_CONVOLUTION_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cached_layout(weight: Tensor) -> torch.memory_format:
    """Channels-last on CPU, where it makes oneDNN run the layer channels-last (README, "Speed"); elsewhere the
    weight's own layout, so that a model the caller made channels-last (what cuDNN's reduced-precision kernels
    want) runs channels-last and one left contiguous does not switch layouts at every convolution."""
    if weight.device.type == "cpu" or weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


__all__ = ["StandardizedWeights", "standardize_weight"]
