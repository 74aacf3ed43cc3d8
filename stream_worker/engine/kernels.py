"""An inference-only form of :class:`~stream_worker.engine.network.ApogeeNet`, built from its
weights and a :class:`~stream_worker.engine.precision.NetworkForm`.

Same function, less work: each BatchNorm (eval mode: a fixed affine map) is folded into the
convolution before it; the convolutions run as ``(1 x k)`` 2-D convolutions in channels-last
layout, which oneDNN executes markedly faster on CPUs; a residual convolution whose form is
``fft-f32`` is computed by FFT (overlap-save), which needs several times fewer multiplications
than the direct sum and agrees with it to float32 rounding; ``direct-bf16`` convolutions and a
``bf16`` head's first layer run in bfloat16 between float32 activations. The residual stream, the input scaling,
the first convolution and the pooling stay float32 in every form (tests/test_fused.py). Which
form each layer takes is the precision plan's decision, not this module's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from stream_worker.engine.network import ApogeeNet
from stream_worker.engine.precision import NetworkForm


def fold_conv(conv: nn.Conv1d, bn: nn.BatchNorm1d) -> nn.Conv2d:
    """``bn(conv(x))`` as one ``(1 x k)`` Conv2d: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]),
                       padding=(0, conv.padding[0]), bias=True, device=conv.weight.device)
    with torch.no_grad():
        folded.weight.copy_((conv.weight * scale[:, None, None]).unsqueeze(2))
        folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return folded.to(memory_format=torch.channels_last)


# Tiles of 256 samples (227 outputs each) and 2 spectra per round, so that a round's spectra stay
# in cache, were fastest on CPUs (2-core AVX-512 EPYC). Other devices take all rows in one round:
# a GPU's 64-row trunk pass in 2-row rounds would be 32 rounds of 8 small kernel launches per
# convolution, bound by launch overhead instead of arithmetic.
SPECTRAL_TILE = 256
SPECTRAL_ROWS = {"cpu": 2}


class SpectralConv(nn.Module):
    """A folded ``(1 x k)`` convolution computed by FFT, overlap-save: the padded input is cut
    into overlapping tiles of ``tile`` samples, each gives ``tile - k + 1`` outputs, and the
    channel mixing is one complex matrix product per frequency over all tiles of ``rows``
    spectra (by default :data:`SPECTRAL_ROWS` of the weights' device, else all rows in one
    round). Float32 throughout; agrees with the direct sum to float32 rounding. Takes
    ``(B, C, 1, L)`` in any memory format and returns ``(B, C_out, 1, L_out)``."""

    def __init__(self, conv: nn.Conv2d, tile: int = SPECTRAL_TILE, rows: int | None = None) -> None:
        super().__init__()
        kernel = conv.weight.detach().float().squeeze(2)  # (out, in, k)
        self.out_channels, _, self.taps = kernel.shape
        if tile <= self.taps:
            raise ValueError(f"FFT tile {tile} must exceed the kernel ({self.taps} taps)")
        self.tile = tile
        self.rows = rows or SPECTRAL_ROWS.get(conv.weight.device.type)  # None: all rows at once
        self.padding = conv.padding[1]
        # cross-correlation = convolution with the reversed kernel; (frequencies, in, out) for bmm
        spectrum = torch.fft.rfft(torch.flip(kernel, [-1]), n=tile)
        self.register_buffer("kernel_spectrum", spectrum.permute(2, 1, 0).contiguous())
        self.register_buffer("bias", conv.bias.detach().float()[:, None, None].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.squeeze(2).float()  # (B, C, L)
        batch, _, length = x.shape
        valid = self.tile - self.taps + 1
        out_length = length + 2 * self.padding - self.taps + 1
        tiles = -(-out_length // valid)
        right = tiles * valid + self.taps - 1 - length - self.padding
        out = x.new_empty(batch, self.out_channels, tiles * valid)
        step = self.rows or max(batch, 1)
        for first in range(0, batch, step):
            part = F.pad(x[first : first + step], (self.padding, right)).unfold(-1, self.tile, valid)
            spectra = torch.fft.rfft(part)  # (rows, C, T, F)
            rows, channels, _, frequencies = spectra.shape
            mixed = torch.bmm(spectra.permute(3, 0, 2, 1).reshape(frequencies, rows * tiles, channels),
                              self.kernel_spectrum)  # (F, rows*T, out)
            mixed = mixed.view(frequencies, rows, tiles, -1).permute(1, 3, 2, 0)  # (rows, out, T, F)
            torch.add(torch.fft.irfft(mixed, n=self.tile)[..., self.taps - 1 :], self.bias,
                      out=out[first : first + rows].view(rows, self.out_channels, tiles, valid))
        return out[..., :out_length].unsqueeze(2)


class InBFloat16(nn.Module):
    """``module`` run in bfloat16 (weights and input rounded, float32 accumulation in oneDNN),
    float32 in and out, so it drops into a float32 network."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(torch.bfloat16)).float()


def conv_as(conv: nn.Conv2d, form: str) -> nn.Module:
    """The folded ``conv`` as it runs in ``form`` (one of the plan's ``CONV_FORMS``)."""
    if form == "fft-f32":
        return SpectralConv(conv)
    return InBFloat16(copy.deepcopy(conv)) if form == "direct-bf16" else conv


class FusedResBlock(nn.Module):
    """The residual block with the zero-padded shortcut added in place into its channel slice
    (no padded copy) and in-place activations; float32 in and out."""

    def __init__(self, block, forms: tuple[str, str]) -> None:
        super().__init__()
        self.conv1 = conv_as(fold_conv(block.conv1, block.bn1), forms[0])
        self.conv2 = conv_as(fold_conv(block.conv2, block.bn2), forms[1])
        self.first_channel = block.shortcut_padding[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.conv1, InBFloat16) and isinstance(self.conv2, InBFloat16):
            # the activation between two bfloat16 convolutions stays bfloat16 (the second would
            # round it to that anyway): two conversions fewer, and the ELU reads half the bytes
            out = self.conv2.module(F.elu(self.conv1.module(x.to(torch.bfloat16)), inplace=True)).float()
        else:
            out = self.conv2(F.elu(self.conv1(x), inplace=True))
        out[:, self.first_channel : self.first_channel + x.shape[1]] += x
        return F.elu(out, inplace=True)


# Rows per pass. CPU: 16 keeps a pass's activations in cache (measured fastest); a GPU needs more
# rows per kernel launch to be filled (64 rows: 67 GFLOP in the widest convolution). A 64-spectrum
# chunk with 20 draws is 1344 rows, a multiple of both, so the default stream pads nothing.
TRUNK_ROWS = {"cpu": 16, "cuda": 64}
HEAD_ROWS = 64


class FusedApogeeNet(nn.Module):
    """Takes and returns what :class:`ApogeeNet` does: ``(B, 1, L)`` → ``(B, 3)``."""

    def __init__(self, model: ApogeeNet, form: NetworkForm, trunk_rows: int | None = None) -> None:
        """``trunk_rows``: rows per trunk pass; by default ``TRUNK_ROWS`` for the model's device."""
        super().__init__()
        if len(form.convs) != 2 * len(model.res_blocks):
            raise ValueError(f"the form has {len(form.convs)} convolutions, the network {2 * len(model.res_blocks)}")
        model = model.eval()
        device_type = next(model.parameters()).device.type
        self.pos_enc = model.pos_enc
        self._position: torch.Tensor | None = None  # pos_enc's channel at the last length seen
        self.first_conv = fold_conv(model.first_conv.conv_layer, model.first_conv.bn)
        self.res_blocks = nn.ModuleList(
            FusedResBlock(block, form.convs[2 * i : 2 * i + 2]) for i, block in enumerate(model.res_blocks)
        )
        self.pooled_length = model.sizes.pooled_length
        self.linear_sequential = model.linear_sequential  # shared with the module, not copied
        if form.head == "bf16":
            first, *rest = model.linear_sequential
            self.linear_sequential = nn.Sequential(InBFloat16(copy.deepcopy(first)), *rest)
        self.weights_info = getattr(model, "weights_info", None)
        self.sizes = model.sizes
        self.form = form
        self.trunk_rows = trunk_rows or TRUNK_ROWS.get(device_type, TRUNK_ROWS["cuda"])

    def _with_position(self, x: torch.Tensor) -> torch.Tensor:
        """``pos_enc(x)`` as ``(B, 2, 1, L)`` channels-last, written in one pass: the positional
        channel is computed once per length (it depends on nothing else) and interleaved with
        the flux, instead of concatenated and then copied into that layout."""
        length = x.shape[-1]
        position = self._position
        if position is None or (len(position), position.dtype, position.device) != (length, x.dtype, x.device):
            position = self._position = self.pos_enc.channel(length, x.dtype)
        out = x.new_empty(len(x), 1, length, 2)
        out[..., 0] = x
        out[..., 1] = position
        return out.permute(0, 3, 1, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional trunk: ``(B, 1, L)`` → pooled features ``(B, C * pooled_length)``.
        The adaptive pooling runs on channels-last rows: torch's kernel for that layout sums the
        same samples in the same order (the same bits) vectorised across channels, ~9x faster
        than its one-plane-at-a-time kernel for the FFT convolutions' contiguous output (0.55
        against 5.2 ms for 16 rows of APOGEENet III), which more than pays for the conversion."""
        out = pairwise_max(F.elu(self.first_conv(self._with_position(x)), inplace=True))
        for block in self.res_blocks:
            out = block(out)
        pooled = F.adaptive_avg_pool2d(out.contiguous(memory_format=torch.channels_last), (1, self.pooled_length))
        return torch.flatten(pooled, 1)

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


def pairwise_max(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, (1, 2))`` (an odd last sample dropped, NaN kept) as one elementwise maximum
    of the even and odd samples: the same values, several times faster than oneDNN's pooling of
    channels-last rows on CPUs (0.08 against 0.83 ms for 16 rows of one channel)."""
    even = x.shape[-1] // 2 * 2
    return torch.maximum(x[..., 0:even:2], x[..., 1:even:2])


def _fixed_groups(rows: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """``rows`` split into groups of exactly ``size``, the last one completed with zero rows."""
    missing = -len(rows) % size
    if missing:
        rows = torch.cat([rows, rows.new_zeros((missing, *rows.shape[1:]))])
    return rows.split(size)
