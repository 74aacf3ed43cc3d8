"""Turns (flux, ivar) into the network's input, exactly as the APOGEENet III pipeline does, in
torch on the engine's device.

The host sends each spectrum's flux and ivar once; the error from the ivar, the Monte Carlo noise
draws, the log scaling and the 95th-percentile clip are computed where the network runs, for a
whole chunk of spectra per operation (per-call costs of small operations dominate otherwise).
Arithmetic follows the pipeline's dtypes (the error in the ivar's own dtype, float32 from there
on), and every reduction is written so that a CPU gives the bits numpy and ``torch.quantile``
give (tests/test_preprocess.py), so records did not change when this moved off numpy.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

FLUX_FLOOR = 1e-6
"""Flux is clipped at this before the log, so zeros and chip gaps stay finite."""

CLIP_QUANTILE = 0.95
"""Log flux is clipped at this quantile plus one, per spectrum (and over all its draws)."""

ERROR_CLIP_FACTOR = 5.0
"""Errors are clipped at this many times the median finite error; unknown errors get that value."""


def clean_flux(flux) -> torch.Tensor:
    """``nan_to_num(flux, nan=0)`` in float32: chip gaps become zero flux (and ±inf the largest
    finite numbers, as numpy's ``nan_to_num`` does in the pipeline)."""
    return torch.nan_to_num(torch.as_tensor(flux).float(), nan=0.0)


def median_rows(values: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """numpy's median of each row (of the ``counted`` entries only, which must sort first): the
    middle value, or the mean of the two middle values in the rows' dtype. NaN for no entries."""
    ordered = torch.sort(values, dim=-1).values
    count = torch.full(values.shape[:-1], values.shape[-1], device=values.device) if counted is None \
        else counted.sum(-1)
    lower = ordered.gather(-1, ((count - 1) // 2).clamp(min=0)[..., None])[..., 0]
    upper = ordered.gather(-1, (count // 2).clamp(max=values.shape[-1] - 1)[..., None])[..., 0]
    median = torch.where(count % 2 == 1, lower, (lower + upper) / 2)
    return torch.where(count > 0, median, torch.full_like(median, float("nan")))


def errors_from_ivar(flux: torch.Tensor, ivar: torch.Tensor) -> torch.Tensor:
    """Per-pixel 1-sigma errors ``(N, L)`` float32 from ``(N, L)`` ivar, as the SDSS pipeline
    computes them: ``(1 / nan_to_num(ivar)) ** 0.5`` in the ivar's own dtype, float32 last.

    ivar 0, NaN and negative values give an infinite error, which ends at 5x the median of the
    spectrum's finite errors; every error is clipped at that value. ivar = +inf becomes the
    dtype's largest number, so its error is tiny (5e-20 in float32; 0 once a float64 one is cast)
    and it counts in the median. A spectrum whose every error is infinite gets
    ``0.1 * median(flux)``. (One deliberate difference: the pipeline gives negative ivar a NaN
    error, which also ends at 5x the median, except in a spectrum without any positive ivar,
    where it makes every number NaN.) ``flux``: the cleaned float32 flux.
    """
    if ivar.dtype not in (torch.float32, torch.float64):
        ivar = ivar.float()
    informative = torch.nan_to_num(ivar)
    informative = torch.where(informative > 0, informative, torch.zeros_like(informative))
    error = torch.sqrt(1 / informative)
    infinite = torch.isinf(error)
    fallback = (0.1 * median_rows(flux).double()).to(ivar.dtype)
    error = torch.where(infinite.all(-1, keepdim=True), fallback[:, None], error)
    finite = ~torch.isinf(error)
    limit = ERROR_CLIP_FACTOR * median_rows(torch.where(finite, error, torch.inf), finite)
    error = torch.minimum(error, limit[:, None])
    return torch.where(torch.isnan(error), limit[:, None], error).float()


def dtype_groups(rows: Sequence) -> dict:
    """The indices of ``rows`` (arrays or tensors) by dtype, in order: rows are stacked per dtype,
    never converted to a common one, so a spectrum's error has the same bits whatever its companions."""
    groups: dict = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.dtype, []).append(i)
    return groups


def errors_of(flux: torch.Tensor, ivar) -> torch.Tensor:
    """``errors_from_ivar`` for an ``(N, L)`` ivar array or tensor (one dtype), or for ``N`` rows
    that may differ in dtype: each dtype's rows together, never converted to a common dtype, so a
    spectrum's error has the same bits whatever its companions."""
    if isinstance(ivar, (torch.Tensor, np.ndarray)) and ivar.ndim == 2:
        return errors_from_ivar(flux, torch.as_tensor(ivar, device=flux.device))
    rows = [torch.as_tensor(row, device=flux.device) for row in ivar]
    error = torch.empty(flux.shape, dtype=torch.float32, device=flux.device)
    for indices in dtype_groups(rows).values():
        index = torch.tensor(indices, device=flux.device)
        error[index] = errors_from_ivar(flux[index], torch.stack([rows[i] for i in indices]))
    return error


def clip_level(flat: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(flat, 0.95, dim=-1, keepdim=True)``, bit for bit, by selection instead of
    a full sort: the two order statistics around the rank (``topk`` of the top 5%, then the two
    smallest of those) and torch's linear interpolation, with the rank computed as the running
    torch computes it (:func:`torch_rank_convention`). A row holding NaN gives NaN, as
    ``torch.quantile`` does. Under a torch whose quantile follows neither known convention, this
    is ``torch.quantile`` itself: slower, never different."""
    convention = _running_rank_convention()
    if convention is None:
        return torch.quantile(flat, CLIP_QUANTILE, dim=-1, keepdim=True)
    return clip_by_selection(flat, convention)


RANK_CONVENTIONS = ("double", "float32")
"""How ``torch.quantile`` computes the rank q·(n−1) of float32 values: from float32 q in double
(torch 2.15), or in float32 (torch 2.11, the GPU machines' image). The two differ in the last
bits of the clip level for most lengths, so the engine asks the torch it runs on."""


def torch_rank_convention(quantile=torch.quantile) -> str | None:
    """The convention of :data:`RANK_CONVENTIONS` under which selection gives what ``quantile``
    gives, on step functions of a few lengths where the two conventions differ; None if neither."""
    probes = []
    for n in (4, 7, 10):
        probe = torch.zeros(1, n)
        probe[:, int(_rank(n, "double")) + 1 :] = 1.0
        probes.append(probe)
    for convention in RANK_CONVENTIONS:
        if all(torch.equal(clip_by_selection(probe, convention), quantile(probe, CLIP_QUANTILE, dim=-1, keepdim=True))
               for probe in probes):
            return convention
    return None


@functools.cache
def _running_rank_convention() -> str | None:
    convention = torch_rank_convention()
    if convention is None:
        log.warning("torch %s computes quantiles by neither known rank convention: the clip level uses "
                    "torch.quantile (a full sort) to stay exact", torch.__version__)
    return convention


def _rank(n: int, convention: str) -> float:
    q = np.float32(CLIP_QUANTILE)
    return float(q * np.float32(n - 1)) if convention == "float32" else float(q) * (n - 1)


def clip_by_selection(flat: torch.Tensor, convention: str) -> torch.Tensor:
    """The 95% quantile of each row of ``flat`` from two order statistics, the rank computed by
    ``convention``."""
    n = flat.shape[-1]
    rank = _rank(n, convention)
    below_index = int(rank)
    weight = float(np.float32(rank - below_index))
    top = torch.topk(flat, n - below_index, dim=-1, sorted=False).values
    if n - below_index >= 2:
        pair = torch.topk(top, 2, dim=-1, largest=False, sorted=True).values
        level = torch.lerp(pair[..., :1], pair[..., 1:], weight)
    else:
        level = top
    # topk ranks NaN above every number, so a row holding NaN holds one in its top values
    return torch.where(torch.isnan(top).any(-1, keepdim=True), torch.full_like(level, float("nan")), level)


def log_scale(flux: torch.Tensor, dims: int = 1) -> torch.Tensor:
    """Clipped log flux. The 95% quantile is taken over the last ``dims`` axes together:
    ``dims=1`` per spectrum (clean pass), ``dims=2`` over all draws of one spectrum (noisy pass),
    never across spectra."""
    return log_scale_(flux.clone(), dims)


def log_scale_(values: torch.Tensor, dims: int = 1) -> torch.Tensor:
    """:func:`log_scale` in place (no buffer allocated: a chunk's draws are tens of MB);
    ``values``' last ``dims`` axes must be contiguous together."""
    values.clamp_(min=FLUX_FLOOR).log_()
    flat = values.view(*values.shape[: values.dim() - dims], -1)
    torch.minimum(flat, clip_level(flat) + 1, out=flat)
    return values


def spectrum_seed(seed: int, spectrum_id: str) -> int:
    """A 63-bit seed from the configured seed and the spectrum's identifier, so a spectrum's
    noise draws (and so its uncertainties) are the same in any batch, worker or re-delivery."""
    digest = hashlib.sha256(f"{int(seed)}\x00{spectrum_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_draws(spectrum_id: str, seed: int, num_draws: int, n_pixels: int,
                device: str | torch.device = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normal draws ``(num_draws, n_pixels)`` from a generator owned by this spectrum, on
    ``device`` (or into ``out``, contiguous float32 of that shape: the same numbers). Reproducible
    per device type: a CUDA generator draws other numbers than the CPU's."""
    if out is None:
        out = torch.empty((num_draws, n_pixels), dtype=torch.float32, device=device)
    if out.shape != (num_draws, n_pixels) or not out.is_contiguous():
        raise ValueError(f"noise goes into a contiguous ({num_draws}, {n_pixels}) tensor, got {tuple(out.shape)}")
    generator = torch.Generator(device=out.device).manual_seed(spectrum_seed(seed, spectrum_id))
    return out.normal_(generator=generator)  # what torch.randn does, in place


def network_inputs(flux, ivar, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clean and noisy network inputs, for one spectrum or a stack of them, on the device the
    inputs are on (numpy arrays count as CPU tensors).

    One spectrum: ``flux``/``ivar`` ``(L,)``, ``noise`` ``(D, L)`` → clean ``(1, 1, L)``, noisy
    ``(D, 1, L)``. A stack: ``(N, L)`` flux, ``N`` ivar rows (an array or a sequence, each row in
    its own dtype) and ``(N, D, L)`` noise → ``(N, 1, L)`` and ``(N, D, 1, L)``.
    """
    flux = torch.as_tensor(flux)
    single = flux.dim() == 1
    flux = flux[None] if single else flux
    draws = 0 if noise is None else noise.shape[-2]
    rows = torch.empty((len(flux), 1 + draws, flux.shape[-1]), dtype=torch.float32, device=flux.device)
    if draws:
        rows[:, 1:] = noise.reshape(len(flux), draws, -1)
    input_rows(flux, [ivar] if single else ivar, rows)
    clean, noisy = rows[:, :1], rows[:, 1:].unsqueeze(2) if draws else None
    if single:
        return clean, None if noisy is None else noisy[0]
    return clean, noisy


def input_rows(flux, ivar, rows: torch.Tensor) -> torch.Tensor:
    """Fills ``rows`` ``(N, 1 + D, L)`` float32 with the network's inputs, in place: on entry
    ``rows[:, 1:]`` holds each spectrum's standard normal draws, on return ``rows[:, 0]`` its
    clean input and ``rows[:, 1:]`` its noisy ones, ``flux + error * noise`` in linear flux, log
    scaled together per spectrum. ``flux`` ``(N, L)``; ``ivar``: ``(N, L)``, or ``N`` rows each in
    its own dtype.
    One buffer for all of it: the draws of a 64-spectrum chunk are 44 MB, and each temporary
    of that size costs a fresh allocation and a pass."""
    flux32 = clean_flux(flux)
    rows[:, 0] = flux32
    log_scale_(rows[:, 0])
    if rows.shape[1] > 1:
        error = errors_of(flux32, ivar)
        noisy = rows[:, 1:]
        noisy.mul_(error[:, None, :]).add_(flux32[:, None, :])  # = flux + error * noise, bit for bit
        log_scale_(noisy, dims=2)
    return rows
