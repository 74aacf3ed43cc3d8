"""The APOGEENet III network: small blocks composed by one class, every size an argument.

The module tree mirrors the official state dict key for key (see
``shared/reference/apogeenet_state_dict.txt``), so the SDSS weights load unchanged and strictly
(:mod:`stream_worker.engine.weights`). Every size is a constructor argument so that smaller
variants (the demonstration model, the tests' tiny networks) share this code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class PositionalChannel(nn.Module):
    """Appends ``sin(i * inv_freq)`` for pixel index ``i`` as a second input channel."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.ones(1))

    def channel(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The positional channel ``(length,)`` in ``dtype``."""
        position = torch.arange(length, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        return torch.sin(position * self.inv_freq).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = self.channel(x.shape[-1], x.dtype)
        return torch.cat([x, channel.expand(x.shape[0], 1, -1)], dim=1)


class ConvBlock(nn.Module):
    """Conv1d → BatchNorm → ELU → MaxPool(2): the stem that halves the spectrum's length."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int) -> None:
        super().__init__()
        self.conv_layer = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool1d(F.elu(self.bn(self.conv_layer(x))), 2)


class ResBlock(nn.Module):
    """Two bias-free convolutions whose paddings (p, p-1) keep the length; the shortcut
    zero-pads the channel axis (``d//2`` before, the rest after) instead of a projection."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size, padding=padding - 1, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        extra = out_channels - in_channels
        self.shortcut_padding = (0, 0, extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.elu(self.bn1(self.conv1(x)))))
        return F.elu(out + F.pad(x, self.shortcut_padding))


class LinearBlock(nn.Module):
    """Linear → ReLU, named as in the official weights."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear_layer = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear_layer(x))


@dataclass(frozen=True)
class ModelSizes:
    """Every size of the network; the defaults are APOGEENet III (72,606,495 parameters)."""

    channels: tuple[int, ...] = (4, 8, 16, 32, 64)
    kernel_size: int = 30
    pooled_length: int = 1024
    linear_width: int = 1024
    linear_layers: int = 6
    n_outputs: int = 3


class ApogeeNet(nn.Module):
    """APOGEENet III: positional channel, conv stem, residual blocks, adaptive pooling, MLP head.

    Input ``(B, 1, L)`` log-scaled flux; output ``(B, 3)`` normalised ``[logg, log_teff, fe_h]``.
    """

    def __init__(
        self,
        channels: tuple[int, ...] = ModelSizes.channels,
        kernel_size: int = ModelSizes.kernel_size,
        pooled_length: int = ModelSizes.pooled_length,
        linear_width: int = ModelSizes.linear_width,
        linear_layers: int = ModelSizes.linear_layers,
        n_outputs: int = ModelSizes.n_outputs,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"channels needs the stem width and at least one block, got {channels}")
        self.sizes = ModelSizes(channels, kernel_size, pooled_length, linear_width, linear_layers, n_outputs)
        padding = kernel_size // 2
        self.pos_enc = PositionalChannel()
        self.first_conv = ConvBlock(2, channels[0], kernel_size, padding)
        self.res_blocks = nn.ModuleList(
            ResBlock(c_in, c_out, kernel_size, padding) for c_in, c_out in zip(channels, channels[1:])
        )
        self.adapt_pool = nn.AdaptiveAvgPool1d(pooled_length)
        widths = [channels[-1] * pooled_length] + [linear_width] * linear_layers
        self.linear_sequential = nn.Sequential(
            *(LinearBlock(w_in, w_out) for w_in, w_out in zip(widths, widths[1:])),
            nn.Linear(widths[-1], n_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.first_conv(self.pos_enc(x))
        for block in self.res_blocks:
            out = block(out)
        return self.linear_sequential(torch.flatten(self.adapt_pool(out), 1))
