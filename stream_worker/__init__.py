"""APOGEENet III stellar parameters for APOGEE spectra, online (Kafka) and offline (apStar files)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stream-worker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
