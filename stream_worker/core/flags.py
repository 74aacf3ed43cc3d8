"""The ``result_flags`` bitmask: which results a user should not trust, and why."""

from __future__ import annotations

import enum


class ResultFlags(enum.IntFlag):
    """Bits of ``result_flags``, as in the APOGEENet III pipeline."""

    RUNTIME_EXCEPTION = 1 << 0
    UNRELIABLE_TEFF = 1 << 1
    UNRELIABLE_LOGG = 1 << 2
    UNRELIABLE_FE_H = 1 << 3


FLAG_NAMES = {
    ResultFlags.RUNTIME_EXCEPTION: "flag_runtime_exception",
    ResultFlags.UNRELIABLE_TEFF: "flag_unreliable_teff",
    ResultFlags.UNRELIABLE_LOGG: "flag_unreliable_logg",
    ResultFlags.UNRELIABLE_FE_H: "flag_unreliable_fe_h",
}

TEFF_RANGE = (1_700.0, 100_000.0)
LOGG_RANGE = (-1.0, 6.0)
"""The user's specification and the pipeline's help text; the SDSS code itself tests ``logg > 10``."""
FE_H_RANGE = (-4.0, 2.0)
FE_H_MIN_TEFF = 3_200.0
FE_H_MAX_LOGG = 5.0

WARN_FLAGS = ResultFlags.UNRELIABLE_FE_H
BAD_FLAGS = (
    ResultFlags.RUNTIME_EXCEPTION
    | ResultFlags.UNRELIABLE_TEFF
    | ResultFlags.UNRELIABLE_LOGG
    | ResultFlags.UNRELIABLE_FE_H
)


def _outside(value: float, bounds: tuple[float, float]) -> bool:
    return not bounds[0] <= value <= bounds[1]


def result_flags(teff: float, logg: float, fe_h: float) -> ResultFlags:
    """Flags for one spectrum's parameters. The ranges are closed: a value on a bound is trusted."""
    flags = ResultFlags(0)
    if _outside(teff, TEFF_RANGE):
        flags |= ResultFlags.UNRELIABLE_TEFF
    if _outside(logg, LOGG_RANGE):
        flags |= ResultFlags.UNRELIABLE_LOGG
    if teff < FE_H_MIN_TEFF or logg > FE_H_MAX_LOGG or _outside(fe_h, FE_H_RANGE):
        flags |= ResultFlags.UNRELIABLE_FE_H
    return flags


def flag_summary(flags: int) -> dict[str, bool]:
    """The derived booleans every record carries next to the bitmask."""
    return {"flag_warn": bool(flags & WARN_FLAGS), "flag_bad": bool(flags & BAD_FLAGS)}


def set_bits(flags: int) -> list[str]:
    """Names of the bits set in ``flags``, for metrics and logs."""
    return [name for bit, name in FLAG_NAMES.items() if flags & bit]
