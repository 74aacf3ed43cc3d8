"""An inference-only form of :class:`~stream_worker.model.ApogeeNet`, built from its weights.

Same arithmetic, fewer passes over memory: each BatchNorm (eval mode: a fixed affine map) is
folded into the convolution before it, and the convolutions run as ``(1 x k)`` 2-D convolutions
in channels-last layout, which oneDNN executes markedly faster on CPUs. Outputs agree with the
module to float32 rounding (tests/test_fused.py). ``precision="fast"`` additionally runs the
convolutions of the last two residual blocks (~95% of the arithmetic) in bfloat16 (about twice
as fast where the CPU has AVX512-BF16 or AMX, and on GPUs), while the residual stream, the input
scaling, the first convolutions, the pooling and the dense head stay in float32, where reduced
precision would cost accuracy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .model import ApogeeNet

PRECISIONS = ("exact", "fast")


def _folded_conv(conv: nn.Conv1d, bn: nn.BatchNorm1d, dtype: torch.dtype) -> nn.Conv2d:
    """``bn(conv(x))`` as one ``(1 x k)`` Conv2d: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]),
                       padding=(0, conv.padding[0]), bias=True)
    with torch.no_grad():
        folded.weight.copy_((conv.weight * scale[:, None, None]).unsqueeze(2))
        folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return folded.to(dtype=dtype, memory_format=torch.channels_last)


class FusedResBlock(nn.Module):
    """The residual block with the zero-padded shortcut added in place into its channel slice
    (no padded copy) and in-place activations. The residual stream stays float32; with a
    bfloat16 ``dtype`` only the convolutions (and the activation between them) run in it."""

    def __init__(self, block, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv1 = _folded_conv(block.conv1, block.bn1, dtype)
        self.conv2 = _folded_conv(block.conv2, block.bn2, dtype)
        self.first_channel = block.shortcut_padding[2]
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.elu(self.conv1(x.to(self.dtype)), inplace=True)).float()
        out[:, self.first_channel : self.first_channel + x.shape[1]] += x
        return F.elu(out, inplace=True)


class FusedApogeeNet(nn.Module):
    """Takes and returns what :class:`ApogeeNet` does: ``(B, 1, L)`` → ``(B, 3)``."""

    def __init__(self, model: ApogeeNet, precision: str = "exact", trunk_rows: int = 16) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        model = model.eval()
        self.pos_enc = model.pos_enc
        self.first_conv = _folded_conv(model.first_conv.conv_layer, model.first_conv.bn, torch.float32)
        # fast: bfloat16 convolutions in the last two blocks, which hold ~95% of the arithmetic
        fast_from = len(model.res_blocks) - 2 if precision == "fast" else len(model.res_blocks)
        self.res_blocks = nn.ModuleList(
            FusedResBlock(block, torch.bfloat16 if i >= fast_from else torch.float32)
            for i, block in enumerate(model.res_blocks)
        )
        self.adapt_pool = model.adapt_pool
        self.linear_sequential = model.linear_sequential
        self.weights_info = getattr(model, "weights_info", None)
        self.sizes = model.sizes
        self.precision = precision
        self.trunk_rows = trunk_rows

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional trunk: ``(B, 1, L)`` → pooled features ``(B, C * pooled_length)``."""
        out = self.pos_enc(x).unsqueeze(2).contiguous(memory_format=torch.channels_last)
        out = F.max_pool2d(F.elu(self.first_conv(out), inplace=True), (1, 2))
        for block in self.res_blocks:
            out = block(out)
        return torch.flatten(self.adapt_pool(out.squeeze(2)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk runs ``trunk_rows`` rows at a time (its activations stay in cache); the head
        takes all rows at once, so its large first weight matrix is read once per call, not once
        per small batch."""
        features = torch.cat([self.features(part) for part in x.split(self.trunk_rows)])
        return self.linear_sequential(features)
