"""An independent functional BiT forward, written from docs/recipe.md ("Architecture"), for parity tests.

Plain tensor arithmetic on a state dict with stock-transformers names; no code shared with
`modeling_bit`. Works in any float dtype (tests use float64 for tight comparisons).
"""

import torch
import torch.nn.functional as F


def standardize(kernel: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    mean = kernel.mean(dim=(1, 2, 3), keepdim=True)
    var = ((kernel - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # population variance
    return (kernel - mean) / torch.sqrt(var + eps)


def group_norm_relu(x, state, prefix, groups):
    return F.relu(F.group_norm(x, groups, state[prefix + ".weight"], state[prefix + ".bias"], eps=1e-5))


def reference_forward(state: dict, pixel_values: torch.Tensor, depths, groups: int, eps: float = 1e-10):
    """Logits (or pooled pre-logits when the state has no classifier) of a BiT network."""
    conv = lambda x, key, stride=1: F.conv2d(  # noqa: E731
        x, standardize(state[key], eps), stride=stride, padding=(state[key].shape[-1] - 1) // 2
    )
    x = conv(pixel_values, "bit.embedder.convolution.weight", stride=2)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=0.0), kernel_size=3, stride=2)
    for stage, depth in enumerate(depths):
        for unit in range(depth):
            prefix = f"bit.encoder.stages.{stage}.layers.{unit}"
            stride = 2 if (stage > 0 and unit == 0) else 1
            pre = group_norm_relu(x, state, prefix + ".norm1", groups)
            shortcut = conv(pre, prefix + ".downsample.conv.weight", stride) if unit == 0 else x
            h = conv(pre, prefix + ".conv1.weight")
            h = conv(group_norm_relu(h, state, prefix + ".norm2", groups), prefix + ".conv2.weight", stride)
            h = conv(group_norm_relu(h, state, prefix + ".norm3", groups), prefix + ".conv3.weight")
            x = h + shortcut
    x = group_norm_relu(x, state, "bit.norm", groups)
    pooled = x.mean(dim=(2, 3))
    if "classifier.1.weight" not in state:
        return pooled
    return pooled @ state["classifier.1.weight"].T + state["classifier.1.bias"]
