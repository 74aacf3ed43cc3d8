"""Shared builders for tests: small networks, failing networks, records from estimates; the
inputs shared with the benchmarks come from :mod:`devtools.samples`."""

from __future__ import annotations

import torch

# shared with the benchmarks, re-exported for the tests
from devtools.samples import DATA, DWARF_FILE, GIANT_FILE, consumed, synthetic_spectra  # noqa: F401
from stream_worker.engine.weights import random_model

SMALL_SIZES = dict(channels=(4, 8), kernel_size=30, pooled_length=16, linear_width=32, linear_layers=2)


def small_model(seed: int = 0):
    """A tiny ApogeeNet variant: the full code path at a fraction of the cost."""
    return random_model(device="cpu", seed=seed, **SMALL_SIZES)


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
