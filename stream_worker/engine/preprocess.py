"""Turns (flux, ivar) into the network's input, exactly as the APOGEENet III pipeline does.

Pure functions. Arithmetic follows the pipeline's dtypes (the error in the ivar's own dtype, then
float32 from there on), so the same spectrum gives the same input bits here and there.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

FLUX_FLOOR = 1e-6
"""Flux is clipped at this before the log, so zeros and chip gaps stay finite."""

CLIP_QUANTILE = 0.95
"""Log flux is clipped at this quantile plus one, per spectrum (and over all its draws)."""

ERROR_CLIP_FACTOR = 5.0
"""Errors are clipped at this many times the median finite error; unknown errors get that value."""


def clean_flux(flux: np.ndarray) -> np.ndarray:
    """``nan_to_num(flux, nan=0)`` in float32: chip gaps become zero flux."""
    return np.nan_to_num(np.asarray(flux, dtype=np.float32), nan=0.0)


def error_from_ivar(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Per-pixel 1-sigma error from inverse variance, for one spectrum, as the SDSS pipeline
    computes it: ``(1 / nan_to_num(ivar)) ** 0.5`` in the ivar's own dtype, cast to float32 last.

    ivar 0, NaN and negative values give an infinite error, which ends at 5x the median of the
    finite errors; every error is clipped at that value. ivar = +inf becomes the dtype's largest
    number, so its error is tiny (5e-20 in float32; 0 once a float64 one is cast) and it counts
    in the median. A spectrum whose every error is infinite gets ``0.1 * median(flux)``. (One
    deliberate difference: the pipeline gives negative ivar a NaN error, which also ends at 5x the
    median, except in a spectrum without any positive ivar, where it makes every number NaN.)
    """
    ivar = np.asarray(ivar)
    if ivar.dtype not in (np.float32, np.float64):
        ivar = ivar.astype(np.float32)
    one = ivar.dtype.type(1)
    informative = np.nan_to_num(ivar)
    informative[informative < 0] = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        error = np.divide(one, informative) ** ivar.dtype.type(0.5)
        if np.isinf(error).all():
            error = np.full_like(error, 0.1 * float(np.median(clean_flux(flux))))
        finite = error[~np.isinf(error)]
        limit = ivar.dtype.type(ERROR_CLIP_FACTOR) * np.nanmedian(finite) if finite.size else ivar.dtype.type(np.nan)
        error = np.clip(error, None, limit)
        return np.where(np.isnan(error), limit, error).astype(np.float32)


def log_scale(flux: torch.Tensor, dims: int = 1) -> torch.Tensor:
    """Clipped log flux. The 95% quantile is taken over the last ``dims`` axes together:
    ``dims=1`` per spectrum (clean pass), ``dims=2`` over all draws of one spectrum (noisy pass),
    never across spectra."""
    logged = torch.log(torch.clamp(flux, min=FLUX_FLOOR))
    flat = logged.reshape(*logged.shape[: logged.dim() - dims], -1)
    ceiling = torch.quantile(flat, CLIP_QUANTILE, dim=-1, keepdim=True) + 1
    return torch.minimum(flat, ceiling).reshape(logged.shape)


def spectrum_seed(seed: int, spectrum_id: str) -> int:
    """A 63-bit seed from the configured seed and the spectrum's identifier, so a spectrum's
    noise draws (and so its uncertainties) are the same in any batch, worker or re-delivery."""
    digest = hashlib.sha256(f"{int(seed)}\x00{spectrum_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_draws(spectrum_id: str, seed: int, num_draws: int, n_pixels: int) -> torch.Tensor:
    """Standard normal draws ``(num_draws, n_pixels)`` from a generator owned by this spectrum."""
    generator = torch.Generator().manual_seed(spectrum_seed(seed, spectrum_id))
    return torch.randn((num_draws, n_pixels), generator=generator, dtype=torch.float32)


def network_inputs(
    flux: np.ndarray, ivar: np.ndarray, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clean and noisy network inputs, for one spectrum or a stack of them.

    One spectrum: ``flux``/``ivar`` ``(L,)``, ``noise`` ``(D, L)`` → clean ``(1, 1, L)``, noisy
    ``(D, 1, L)``. A stack: ``(N, L)`` flux, ``N`` ivar rows (an array or a sequence, each row in
    its own dtype) and ``(N, D, L)`` noise → ``(N, 1, L)`` and ``(N, D, 1, L)``.
    Noisy inputs are ``flux + error * noise`` in linear flux, log scaled together per spectrum.
    A stack goes through each elementwise operation in one call, which matters: per-call costs
    of small tensor operations dominate otherwise.
    """
    single = np.ndim(flux) == 1
    flux2 = np.atleast_2d(flux)
    ivar_rows = [ivar] if single else ivar  # never stacked: each spectrum's ivar keeps its own dtype
    flux32 = torch.from_numpy(clean_flux(flux2))
    clean = log_scale(flux32).unsqueeze(1)
    noisy = None
    if noise is not None and noise.shape[-2] > 0:
        error = torch.from_numpy(np.stack([error_from_ivar(f, v) for f, v in zip(flux2, ivar_rows)]))
        draws = noise.reshape(len(flux2), -1, flux2.shape[-1])
        noisy = log_scale(flux32[:, None, :] + error[:, None, :] * draws, dims=2).unsqueeze(2)
    if single:
        return clean, None if noisy is None else noisy[0]
    return clean, noisy
