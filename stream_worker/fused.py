"""An inference-only form of :class:`~stream_worker.model.ApogeeNet`, built from its weights.

Same function, less work: each BatchNorm (eval mode: a fixed affine map) is folded into the
convolution before it; the convolutions run as ``(1 x k)`` 2-D convolutions in channels-last
layout, which oneDNN executes markedly faster on CPUs; and on CPUs the widest ones (the last
residual block: ~70% of all arithmetic) are computed by FFT (overlap-save), which needs several
times fewer multiplications than the direct sum for a 30-tap kernel and agrees with it to float32
rounding. Outputs agree with the module to float32 rounding (tests/test_fused.py).

``precision="fast"`` instead runs the convolutions of the last two residual blocks directly in
bfloat16 (twice as fast as direct float32 where the CPU has AVX512-BF16 or AMX, and on GPUs; a
little faster than the float32 FFT), while the residual stream, the input scaling, the first
convolutions, the pooling and the dense head stay in float32, where reduced precision would cost
accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .model import ApogeeNet

PRECISIONS = ("exact", "fast")


def _folded_conv(conv: nn.Conv1d, bn: nn.BatchNorm1d) -> nn.Conv2d:
    """``bn(conv(x))`` as one ``(1 x k)`` Conv2d: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]),
                       padding=(0, conv.padding[0]), bias=True)
    with torch.no_grad():
        folded.weight.copy_((conv.weight * scale[:, None, None]).unsqueeze(2))
        folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return folded.to(memory_format=torch.channels_last)


# Where the FFT pays on a CPU (measured, 2-core AVX-512 EPYC): 32->64 and 64->64 channels at 30
# taps run 1.6-2x faster than oneDNN's direct convolution; 32->32 barely, narrower ones not at all.
SPECTRAL_MIN_TAPS = 16
SPECTRAL_MIN_CHANNEL_PRODUCT = 2048
SPECTRAL_TILE = 128


class SpectralConv(nn.Module):
    """A folded ``(1 x k)`` convolution computed by FFT, overlap-save: the padded input is cut
    into overlapping tiles of ``tile`` samples, each gives ``tile - k + 1`` outputs, and the
    channel mixing is one complex matrix product per frequency (rows = spectra x tiles, which
    keeps the products large). Float32 throughout; takes ``(B, C, 1, L)`` in any memory format
    and returns ``(B, C_out, 1, L_out)``."""

    def __init__(self, conv: nn.Conv2d, tile: int = SPECTRAL_TILE) -> None:
        super().__init__()
        kernel = conv.weight.detach().float().squeeze(2)  # (out, in, k)
        self.taps = kernel.shape[-1]
        if tile <= self.taps:
            raise ValueError(f"FFT tile {tile} must exceed the kernel ({self.taps} taps)")
        self.tile = tile
        self.padding = conv.padding[1]
        # cross-correlation = convolution with the reversed kernel; (frequencies, in, out) for bmm
        spectrum = torch.fft.rfft(torch.flip(kernel, [-1]), n=tile)
        self.register_buffer("kernel_spectrum", spectrum.permute(2, 1, 0).contiguous())
        self.register_buffer("bias", conv.bias.detach().float()[:, None].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.squeeze(2).float()  # (B, C, L)
        batch, channels, length = x.shape
        valid = self.tile - self.taps + 1
        out_length = length + 2 * self.padding - self.taps + 1
        tiles = -(-out_length // valid)
        right = tiles * valid + self.taps - 1 - length - self.padding
        padded = F.pad(x, (self.padding, right)).unfold(-1, self.tile, valid)  # (B, C, T, tile)
        spectra = torch.fft.rfft(padded)  # (B, C, T, F)
        frequencies = spectra.shape[-1]
        mixed = torch.bmm(spectra.permute(3, 0, 2, 1).reshape(frequencies, batch * tiles, channels),
                          self.kernel_spectrum)  # (F, B*T, out)
        mixed = mixed.view(frequencies, batch, tiles, -1).permute(1, 3, 2, 0)  # (B, out, T, F)
        out = torch.fft.irfft(mixed, n=self.tile)[..., self.taps - 1:]  # (B, out, T, valid)
        out = out.reshape(batch, -1, tiles * valid)[..., :out_length] + self.bias
        return out.unsqueeze(2)


def _float32_conv(conv: nn.Conv2d, spectral: bool) -> nn.Module:
    """``conv`` itself, or its FFT form where that is faster in float32 (wide channels, long kernel)."""
    out_channels, in_channels, _, taps = conv.weight.shape
    wide = taps >= SPECTRAL_MIN_TAPS and in_channels * out_channels >= SPECTRAL_MIN_CHANNEL_PRODUCT
    return SpectralConv(conv) if spectral and wide else conv


class FusedResBlock(nn.Module):
    """The residual block with the zero-padded shortcut added in place into its channel slice
    (no padded copy) and in-place activations. The residual stream stays float32; with a
    bfloat16 ``dtype`` only the convolutions (and the activation between them) run in it."""

    def __init__(self, block, dtype: torch.dtype, spectral: bool = False) -> None:
        super().__init__()
        if dtype == torch.float32:
            self.conv1 = _float32_conv(_folded_conv(block.conv1, block.bn1), spectral)
            self.conv2 = _float32_conv(_folded_conv(block.conv2, block.bn2), spectral)
        else:  # direct bfloat16 is faster than the float32 FFT
            self.conv1 = _folded_conv(block.conv1, block.bn1).to(dtype)
            self.conv2 = _folded_conv(block.conv2, block.bn2).to(dtype)
        self.first_channel = block.shortcut_padding[2]
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.elu(self.conv1(x.to(self.dtype)), inplace=True)).float()
        out[:, self.first_channel : self.first_channel + x.shape[1]] += x
        return F.elu(out, inplace=True)


# Rows per pass. CPU: 16 keeps a pass's activations in cache (measured fastest); a GPU needs more
# rows per kernel launch to be filled (64 rows: 67 GFLOP in the widest convolution). A 64-spectrum
# chunk with 20 draws is 1344 rows, a multiple of both, so the default stream pads nothing.
TRUNK_ROWS = {"cpu": 16, "cuda": 64}
HEAD_ROWS = 64


class FusedApogeeNet(nn.Module):
    """Takes and returns what :class:`ApogeeNet` does: ``(B, 1, L)`` → ``(B, 3)``."""

    def __init__(self, model: ApogeeNet, precision: str = "exact", trunk_rows: int | None = None,
                 spectral: bool | None = None) -> None:
        """``spectral``: FFT for the widest convolutions; by default on CPUs, where it was measured.
        ``trunk_rows``: rows per trunk pass; by default ``TRUNK_ROWS`` for the model's device."""
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        model = model.eval()
        device_type = next(model.parameters()).device.type
        if spectral is None:
            spectral = device_type == "cpu"
        self.pos_enc = model.pos_enc
        self.first_conv = _folded_conv(model.first_conv.conv_layer, model.first_conv.bn)
        # fast: bfloat16 convolutions in the last two blocks, which hold ~95% of the arithmetic
        fast_from = len(model.res_blocks) - 2 if precision == "fast" else len(model.res_blocks)
        self.res_blocks = nn.ModuleList(
            FusedResBlock(block, torch.bfloat16 if i >= fast_from else torch.float32, spectral)
            for i, block in enumerate(model.res_blocks)
        )
        self.adapt_pool = model.adapt_pool
        self.linear_sequential = model.linear_sequential
        self.weights_info = getattr(model, "weights_info", None)
        self.sizes = model.sizes
        self.precision = precision
        self.trunk_rows = trunk_rows or TRUNK_ROWS.get(device_type, TRUNK_ROWS["cuda"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional trunk: ``(B, 1, L)`` → pooled features ``(B, C * pooled_length)``."""
        out = self.pos_enc(x).unsqueeze(2).contiguous(memory_format=torch.channels_last)
        out = F.max_pool2d(F.elu(self.first_conv(out), inplace=True), (1, 2))
        for block in self.res_blocks:
            out = block(out)
        return torch.flatten(self.adapt_pool(out.squeeze(2)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every row passes through the same tensor shapes whatever its companions: the trunk takes
        exactly ``trunk_rows`` rows at a time (on CPUs its activations then stay in cache) and the
        head exactly ``HEAD_ROWS`` (its large first weight matrix read once per group), the last
        group padded with zero rows. oneDNN, MKL and cuBLAS choose their blocking, and so their
        rounding, by shape (a row computed among 5 or among 16 differed by up to 5e-7), so this is
        what makes a spectrum's numbers bit-identical in any batch, on re-delivery and offline,
        and duplicates safe to drop."""
        features = torch.cat([self.features(part) for part in _fixed_groups(x, self.trunk_rows)])
        outputs = torch.cat([self.linear_sequential(part) for part in _fixed_groups(features, HEAD_ROWS)])
        return outputs[: len(x)]


def _fixed_groups(rows: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """``rows`` split into groups of exactly ``size``, the last one completed with zero rows."""
    missing = -len(rows) % size
    if missing:
        rows = torch.cat([rows, rows.new_zeros((missing, *rows.shape[1:]))])
    return rows.split(size)
