"""A faithful one-spectrum-at-a-time port of the SDSS APOGEENet III pipeline loop.

Written independently of :mod:`stream_worker.engine.preprocess` and :mod:`stream_worker.engine.estimator`, so
tests can check the engine against it and benchmarks can time the reference's cost: a batch-1
clean pass, then a batch-``D`` noisy pass, with autograd left on, as the pipeline runs.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _error(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    ivar = np.nan_to_num(np.asarray(ivar))  # in the input's dtype; +inf becomes its largest number
    with np.errstate(all="ignore"):
        error = np.divide(1, ivar) ** 0.5
        if np.isinf(error).all():
            error = (np.ones(*error.shape) * (0.1 * np.median(flux))).astype(ivar.dtype)
        median_error = np.nanmedian(error[error != np.inf])
        error = np.clip(error, a_min=None, a_max=5 * median_error)
        return np.where(np.isnan(error), 5 * median_error, error)


def _log_scale(flux: torch.Tensor) -> torch.Tensor:
    flux = torch.log(torch.clip(flux, min=0.000001, max=None))
    return torch.clip(flux, min=None, max=torch.quantile(flux, 0.95) + 1)


def _unnormalise(prediction: torch.Tensor) -> torch.Tensor:
    prediction[:, 0] = prediction[:, 0] * 1.2 + 3.2
    prediction[:, 1] = prediction[:, 1] * 0.1 + 3.7
    prediction[:, 2] = prediction[:, 2] * 0.3 - 0.2
    return prediction


def reference_estimate(model: torch.nn.Module, flux: np.ndarray, ivar: np.ndarray, noise: torch.Tensor) -> dict:
    """Raw (un-calibrated) parameters of one spectrum, given its ``(D, L)`` standard-normal noise."""
    flux = np.nan_to_num(flux, nan=0.0).astype(np.float32)
    error = torch.from_numpy(_error(flux, ivar).astype(np.float32)).float()
    flux_t = torch.from_numpy(flux).float()
    device = next(model.parameters()).device
    clean = _unnormalise(model(_log_scale(flux_t).reshape(1, 1, -1).to(device))).squeeze()
    logg, log_teff, fe_h = clean[0].item(), clean[1].item(), clean[2].item()
    noisy = _log_scale(flux_t + error * noise).float()
    draws = _unnormalise(model(noisy.reshape(noisy.shape[0], 1, -1).to(device)))
    std = torch.std(draws, axis=0)
    teff = 10**log_teff
    return {
        "teff": teff,
        "logg": logg,
        "fe_h": fe_h,
        "raw_e_teff": teff * std[1].item() * math.log(10),
        "raw_e_logg": std[0].item(),
        "raw_e_fe_h": std[2].item(),
    }
