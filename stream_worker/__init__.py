"""APOGEENet III stellar parameters for APOGEE spectra, online (Kafka) and offline (apStar files)."""

from importlib.metadata import PackageNotFoundError, version

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
