"""Inputs shared by the tests and the benchmarks: the real DR17 apStar files in ``tests/data``
(provenance: ``tests/data/README.md``) and consumed Kafka messages built without a broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stream_worker.core.grid import N_PIXELS

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
GIANT_FILE = DATA / "apStar-dr17-2M17335483-2753043.fits"
DWARF_FILE = DATA / "apStar-dr17-2M19485057+5005279.fits"


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


def consumed(value, key=b"key", offset=0, headers=None, topic="apogee.spectra", partition=0,
             timestamp=1_764_000_000_000):
    """A message as kafka-python's consumer hands it over."""
    from kafka.consumer.fetcher import ConsumerRecord  # only here: the GPU benchmark has no kafka-python

    return ConsumerRecord(
        topic, partition, -1, offset, timestamp, 0, key, value, list(headers or []), None,
        -1 if key is None else len(key), -1 if value is None else len(value), -1,
    )
