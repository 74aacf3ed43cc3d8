"""The engine's answer for one spectrum: the typed seam between the engine and the records.

An :class:`Estimate` holds the science only — parameters, raw and calibrated uncertainties,
``result_flags``, or the failure that prevented them — plus the engine time it cost. No JSON,
no worker version, no timestamps: records are built from it in one place
(:func:`stream_worker.core.records.build_record`).
"""

from __future__ import annotations

from dataclasses import dataclass

from stream_worker.core.flags import ResultFlags, flag_summary, result_flags
from stream_worker.core.labels import ModelCard

SCIENCE_FIELDS = (
    "teff", "e_teff", "logg", "e_logg", "fe_h", "e_fe_h",
    "raw_e_teff", "raw_e_logg", "raw_e_fe_h",
    "result_flags", "flag_warn", "flag_bad",
)
"""The science fields of every record, in the SDSS pipeline's names."""


@dataclass(frozen=True)
class Estimate:
    """One spectrum's parameters. Without Monte Carlo draws the six uncertainties are ``None``;
    when processing raised, every parameter is ``None``, ``result_flags`` is
    ``flag_runtime_exception`` and ``error_message`` says why, so a failure is never silent."""

    spectrum_id: str
    teff: float | None
    logg: float | None
    fe_h: float | None
    raw_e_teff: float | None
    raw_e_logg: float | None
    raw_e_fe_h: float | None
    e_teff: float | None
    e_logg: float | None
    e_fe_h: float | None
    result_flags: int
    inference_seconds: float
    error_message: str | None = None

    @property
    def flag_warn(self) -> bool:
        return flag_summary(self.result_flags)["flag_warn"]

    @property
    def flag_bad(self) -> bool:
        return flag_summary(self.result_flags)["flag_bad"]

    @property
    def failed(self) -> bool:
        return self.error_message is not None

    def science(self) -> dict:
        """The science fields, by name, for a record."""
        return {name: getattr(self, name) for name in SCIENCE_FIELDS}


def measured(spectrum_id: str, teff: float, logg: float, fe_h: float, raw: tuple[float, float, float] | None,
             card: ModelCard, seconds: float) -> Estimate:
    """A spectrum's estimate from its parameters and raw ``(teff, logg, fe_h)`` spreads."""
    raw_e_teff, raw_e_logg, raw_e_fe_h = raw if raw is not None else (None, None, None)
    return Estimate(
        spectrum_id, teff, logg, fe_h, raw_e_teff, raw_e_logg, raw_e_fe_h,
        card.calibrate(raw_e_teff, "teff"), card.calibrate(raw_e_logg, "logg"), card.calibrate(raw_e_fe_h, "fe_h"),
        int(result_flags(teff, logg, fe_h)), seconds,
    )


def failed(spectrum_id: str, error: BaseException, seconds: float) -> Estimate:
    """The estimate of a spectrum whose processing raised ``error``."""
    return Estimate(spectrum_id, *([None] * 9), int(ResultFlags.RUNTIME_EXCEPTION), seconds,
                    f"{type(error).__name__}: {error}")
