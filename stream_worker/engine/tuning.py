"""Kernels chosen by measurement, on the device the engine runs on, when it starts.

Which form of a convolution is fastest depends on the machine: on a 2-core EPYC without AMX the
FFT beat direct float32 sums in every residual block (2.5x in the last), while on a 2-core Xeon
with AMX the direct sums won in the first two blocks and the FFT in the last two, and direct
bfloat16 in fast mode's draws; on a Xeon with AVX512-BF16 but no AMX every bfloat16 form was
1.4-4x slower than float32 (BENCHMARKS.md). So for each convolution and
the head, every form the precision mode allows is timed for a few passes of the engine's real
shapes (``trunk_rows`` rows of the layer's input), and the fastest is used; the mode's rule-based
form is kept unless another is more than :data:`MARGIN` faster, so that noise does not flip the
plan. Results are cached per process. ``engine.kernels: rules`` skips the measurement, and a
plan's label pins it (``docs/deployment.md``: pods that must give bit-identical records for
redelivered spectra should pin the same plan).

A reduced-precision form is run once against float32 at its layer's shape before it is timed,
and never used if it is off by more than :data:`REDUCED_TOLERANCE` (a pinned plan holding one is
refused): numerical libraries have shapes they compute wrongly (torch 2.15's CPU bfloat16
convolution on an AMX Xeon, for 8 input channels and kernel widths 8, 12 and 16).
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from stream_worker.core.grid import N_PIXELS
from stream_worker.engine.kernels import HEAD_ROWS, InBFloat16, conv_as, fold_conv
from stream_worker.engine.network import ApogeeNet
from stream_worker.engine.precision import REDUCED_FORMS, NetworkForm, PrecisionMode, PrecisionPlan

log = logging.getLogger(__name__)

MARGIN = 0.05
"""Another form must beat the rule's by more than this fraction of its time to replace it."""

REPEATS = 3
"""Timed passes per form (after one warm-up pass); the fastest counts."""

REDUCED_TOLERANCE = 0.02
"""A reduced-precision form is used only within this relative error of float32 at its layer's
shape (bfloat16's rounding gives ~0.003; the broken kernels found give ~1)."""

_REFERENCE = {"conv": "direct-f32", "head": "f32"}
"""What a reduced-precision form of each kind of layer is checked against."""

_MEASURED: dict[tuple, object] = {}
_TIMINGS: dict[tuple, dict] = {}


def measured_plan(model: ApogeeNet, mode: PrecisionMode, device: torch.device, trunk_rows: int,
                  fft: bool = True) -> PrecisionPlan:
    """The plan of ``mode`` for ``model`` on ``device`` whose every layer took the least time.
    The convolutions are measured once for every mode (their allowed forms are the same in all,
    and the draws run the clean pass's), so fast mode reports exact mode's values bit for bit in
    one process, as with fixed rules; a mode that reduces the draws has their convolutions and
    head measured too, starting from the clean pass's forms."""
    sizes = model.sizes
    network = (str(device), sizes, trunk_rows, fft, torch.get_num_threads())
    rule = mode.plan(device.type, sizes.channels, sizes.kernel_size, fft=fft)
    timings = _TIMINGS.setdefault(network, {})

    def measured(part: str, measure):
        key = (*network, part)
        if key not in _MEASURED:
            started = time.perf_counter()
            _MEASURED[key] = measure()
            log.info("kernels measured in %.1f s on %s, %s: %s", time.perf_counter() - started, device, part,
                     _MEASURED[key])
        return _MEASURED[key]

    conv_choices, _ = mode.choices(sizes.channels, fft)
    convs = measured("convolutions", lambda: _fastest_convs(model, device, trunk_rows, conv_choices,
                                                            rule.clean.convs, timings))
    clean = NetworkForm(convs, rule.clean.head)
    draws = clean
    if mode.reduced_draws:  # the draws keep the clean pass's forms unless a checked reduced one is faster
        draw_choices, head_choices = mode.choices(sizes.channels, fft, reduced=True)
        draw_convs = measured(f"{mode.name} draws' convolutions",
                              lambda: _fastest_convs(model, device, trunk_rows, draw_choices, convs, timings))
        head = measured(f"{mode.name} draws' head",
                        lambda: _fastest_head(model, device, head_choices, rule.draws.head, timings))
        draws = NetworkForm(draw_convs, head)
    return PrecisionPlan(mode.name, device.type, clean, draws)


def checked_plan(model: ApogeeNet, plan: PrecisionPlan, device: torch.device, trunk_rows: int) -> PrecisionPlan:
    """``plan`` (a pinned one) if each of its reduced-precision layers computes on ``device`` what
    float32 does, to bfloat16's rounding; else a ValueError naming the layer."""
    layers = [(form, "conv", _conv_builder(conv), _conv_sample(conv, length, trunk_rows, device), f"convolution {i}")
              for i, (form, (conv, length)) in enumerate(zip(plan.draws.convs, _convolutions(model)))
              if form in REDUCED_FORMS]
    if plan.draws.head in REDUCED_FORMS:
        layers.append((plan.draws.head, "head", _head_builder(model.linear_sequential[0]), _head_sample(model, device),
                       "head"))
    for form, kind, build, x, name in layers:
        error = _error(build(form), build(_REFERENCE[kind]), x)
        if error > REDUCED_TOLERANCE:
            raise ValueError(f"the pinned plan's {name} in {form} computes wrongly on {device} "
                             f"(relative error {error:.2g} against float32)")
    return plan


def _fastest_convs(model: ApogeeNet, device: torch.device, rows: int, choices: list, rule: tuple,
                   timings: dict) -> tuple[str, ...]:
    convs = []
    for index, (allowed, (conv, length)) in enumerate(zip(choices, _convolutions(model))):
        convs.append(_choose(allowed, rule[index], _conv_builder(conv),
                             lambda conv=conv, length=length: _conv_sample(conv, length, rows, device),
                             device, timings, ("conv", index)))
    return tuple(convs)


def _fastest_head(model: ApogeeNet, device: torch.device, choices: tuple, rule: str, timings: dict) -> str:
    return _choose(choices, rule, _head_builder(model.linear_sequential[0]), lambda: _head_sample(model, device),
                   device, timings, ("head",))


def _conv_builder(conv: torch.nn.Module):
    return lambda form: conv_as(conv, form)


def _head_builder(first: torch.nn.Module):
    return lambda form: InBFloat16(copy.deepcopy(first)) if form == "bf16" else first


def _conv_sample(conv: torch.nn.Module, length: int, rows: int, device: torch.device) -> torch.Tensor:
    return torch.rand(rows, conv.in_channels, 1, length, device=device).contiguous(memory_format=torch.channels_last)


def _head_sample(model: ApogeeNet, device: torch.device) -> torch.Tensor:
    return torch.rand(HEAD_ROWS, model.sizes.channels[-1] * model.sizes.pooled_length, device=device)


def _choose(allowed, default: str, build, sample, device: torch.device, timings: dict, where: tuple) -> str:
    """The fastest of the ``allowed`` forms on input ``sample()``; nothing is timed when there is
    no choice. A reduced-precision form that does not compute what float32 does (to bfloat16's
    rounding) on this device is never chosen."""
    if len(allowed) == 1:
        return allowed[0]
    x = sample()
    seconds = {}
    for form in allowed:
        if (where, form) not in timings:
            try:
                module = build(form)
            except ValueError:  # e.g. a kernel too long for the FFT tile
                continue
            error = _error(module, build(_REFERENCE[where[0]]), x) if form in REDUCED_FORMS else 0.0
            if error > REDUCED_TOLERANCE:
                log.warning("%s computes %s wrongly on %s (relative error %.2g against float32): not used",
                            form, " ".join(map(str, where)), device, error)
                timings[(where, form)] = float("inf")
            else:
                timings[(where, form)] = _time(module, x, device)
        seconds[form] = timings[(where, form)]
    best = min(seconds, key=seconds.get)
    if default in seconds and seconds[default] <= seconds[best] * (1 + MARGIN):
        return default
    return best


@torch.inference_mode()
def _error(module: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> float:
    """``module``'s relative error against ``reference`` on ``x`` (norm of the difference over
    the norm of the reference's output)."""
    expected = reference(x).double()
    return float((module(x).double() - expected).norm() / expected.norm().clamp_min(1e-30))


@torch.inference_mode()
def _time(module: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float:
    best = float("inf")
    for attempt in range(REPEATS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        module(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:  # the first pass warms caches and allocators up
            best = min(best, time.perf_counter() - started)
    return best


def _convolutions(model: ApogeeNet):
    """Each residual convolution, folded, with the length of its input, in the plan's order."""
    stem = model.first_conv.conv_layer
    length = (N_PIXELS + 2 * stem.padding[0] - stem.kernel_size[0] + 1) // 2  # stem, then max-pool by 2
    for block in model.res_blocks:
        for conv, bn in ((block.conv1, block.bn1), (block.conv2, block.bn2)):
            yield fold_conv(conv, bn), length
            length = length + 2 * conv.padding[0] - conv.kernel_size[0] + 1
