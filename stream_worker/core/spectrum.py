"""One spectrum as it enters the engine, and the checks it must pass first.

Every input path (Kafka inline message, Kafka file reference, apStar file on the command line)
ends in a :class:`Spectrum`; :func:`validate_spectrum` is the single gate before inference.
A rejected input raises :class:`InputError` with a stable reason code: the dead-letter topic,
the logs and the metrics all use that code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream_worker.core.grid import N_PIXELS

SPECTRUM_KINDS = ("coadd", "visit")


class InputError(ValueError):
    """An input that cannot become a result. ``reason`` is a short stable code for machines,
    the message says what was expected and what was found, for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Spectrum:
    """Flux and inverse variance on the apStar grid, with what identifies the observation."""

    spectrum_id: str
    flux: np.ndarray
    ivar: np.ndarray
    source_id: str | None = None
    kind: str = "coadd"
    visit: int | None = None
    telescope: str | None = None
    mjd: float | None = None
    origin: str | None = None
    pixel_mask: np.ndarray | None = None

    def metadata(self) -> dict:
        """Identifying fields copied into the result record."""
        return {
            "spectrum_id": self.spectrum_id,
            "source_id": self.source_id,
            "spectrum_kind": self.kind,
            "visit": self.visit,
            "telescope": self.telescope,
            "mjd": self.mjd,
            "origin": self.origin,
        }


def _float_dtype(values: np.ndarray) -> np.dtype:
    """float64 stays float64 (the pipeline computes ivar and error in the input's dtype), anything
    else becomes float32."""
    wide = values.dtype.kind == "f" and values.dtype.itemsize == 8  # any byte order (FITS is big-endian)
    return np.dtype(np.float64) if wide else np.dtype(np.float32)


def ivar_from_error(error: np.ndarray) -> np.ndarray:
    """``error**-2`` in the error's dtype, with every non-finite or non-positive error mapped to
    ivar 0 (no information). An error so small that its ivar overflows keeps ivar +inf, which
    the engine, like the pipeline, treats as a (nearly) noise-free pixel."""
    error = np.asarray(error)
    error = error.astype(_float_dtype(error), copy=False)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ivar = error.dtype.type(1) / (error * error)
    ivar[~np.isfinite(error) | ~(error > 0)] = 0
    return ivar


def validate_spectrum(spectrum: Spectrum, n_pixels: int = N_PIXELS) -> Spectrum:
    """Rejects what would give silently wrong numbers; returns the spectrum with float32 flux and
    its ivar in float64 if it came so, else float32 (the error is computed in that dtype)."""
    if not spectrum.spectrum_id or not isinstance(spectrum.spectrum_id, str):
        raise InputError("invalid_field", f"spectrum_id must be a non-empty string, got {spectrum.spectrum_id!r}")
    if spectrum.kind not in SPECTRUM_KINDS:
        raise InputError("invalid_field", f"spectrum kind must be one of {SPECTRUM_KINDS}, got {spectrum.kind!r}")
    arrays = {}
    for name in ("flux", "ivar"):
        values = np.asarray(getattr(spectrum, name))
        if values.dtype.kind not in "fiu":
            raise InputError("wrong_dtype", f"{name} must be numeric, got dtype {values.dtype}")
        if values.shape != (n_pixels,):
            raise InputError(
                "wrong_shape", f"{name} must have shape ({n_pixels},) on the apStar grid, got {values.shape}"
            )
        arrays[name] = values.astype(np.float32 if name == "flux" else _float_dtype(values), copy=False)
    if not np.isfinite(arrays["flux"]).any():
        raise InputError("all_nan_flux", "flux has no finite pixel")
    spectrum.flux, spectrum.ivar = arrays["flux"], arrays["ivar"]
    return spectrum
