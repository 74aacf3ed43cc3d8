"""Shared builders for tests (and the benchmarks): small networks, realistic-looking spectra,
consumed messages."""

from __future__ import annotations

import numpy as np
import torch

from devtools.samples import DATA, DWARF_FILE, GIANT_FILE, consumed  # noqa: F401 (shared with the benchmarks)
from stream_worker.core.grid import N_PIXELS
from stream_worker.engine.weights import random_model

SMALL_SIZES = dict(channels=(4, 8), kernel_size=30, pooled_length=16, linear_width=32, linear_layers=2)


def small_model(seed: int = 0):
    """A tiny ApogeeNet variant: the full code path at a fraction of the cost."""
    return random_model(device="cpu", seed=seed, **SMALL_SIZES)


def synthetic_spectra(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flux around 1000 with NaN chip gaps (ivar 0 there) and a few bad pixels, like DR17."""
    rng = np.random.default_rng(seed)
    flux = (1000 + 50 * rng.standard_normal((n, N_PIXELS))).astype(np.float32)
    ivar = np.full((n, N_PIXELS), 1e-3, np.float32) * rng.uniform(0.5, 2, (n, 1)).astype(np.float32)
    flux[:, :322] = np.nan
    flux[:, 3242:3648] = np.nan
    ivar[np.isnan(flux)] = 0
    ivar[:, 5000:5003] = 1e-20
    return flux, ivar


class Explodes(torch.nn.Module):
    """Wraps a model and raises for any batch holding a row with a bright pixel 400: a spectrum
    whose inference fails, for testing that the others in its batch are unaffected."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.weights_info = model.weights_info

    def forward(self, x):
        if torch.any(x[:, 0, 400] > 7.25):  # log(1500) = 7.31; normal pixels are below log(1200)
            raise RuntimeError("boom")
        return self.inner(x)


def records_of(engine, flux, ivar, ids=None) -> list[dict]:
    """The engine's estimates as the records users receive (one builder for stream and files)."""
    from stream_worker.core.records import build_record
    from stream_worker.core.spectrum import Spectrum

    estimates = engine.estimate(flux, ivar, ids)
    return [build_record(Spectrum(e.spectrum_id, f, v), e, engine.provenance) for e, f, v in zip(estimates, flux, ivar)]
