"""APOGEENet III stellar parameters for APOGEE spectra, online (Kafka) and offline (apStar files)."""

import os
from importlib.metadata import PackageNotFoundError, version

# libgomp's idle threads spin 300,000 times after each parallel region before sleeping. Between a
# worker's small host-side operations that burned a core (0.25 of 1.2 CPU ms per spectrum in
# bench.pipelining's host-cost rows) while 10,000 spins cost the CPU engine nothing measurable
# (PASSIVE, no spinning, cost it 20%). libgomp reads this once, when torch loads it, so it takes
# effect wherever stream_worker is imported first (the worker, the CLI). Either variable in the
# environment wins (a GOMP_SPINCOUNT would override OMP_WAIT_POLICY's spinning, so neither is set).
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

try:
    __version__ = version("stream-worker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_PUBLIC = {
    "ApogeeNet": "stream_worker.engine.network",
    "load_model": "stream_worker.engine.weights",
    "Estimator": "stream_worker.engine.estimator",
}


def __getattr__(name: str):
    """``from stream_worker import Estimator, load_model, ApogeeNet``, imported on first use so that
    ``import stream_worker.io.wire`` (a producer) does not pull in torch."""
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'stream_worker' has no attribute {name!r}")
