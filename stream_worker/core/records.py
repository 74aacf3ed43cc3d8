"""Result records: the one place that decides which fields a user receives, and in what form.

Pure functions: an :class:`~stream_worker.engine.uncertainty.Estimate` (or the error that prevented
one) plus provenance in, a flat JSON-ready dict out.
"""

from __future__ import annotations

import datetime as dt

from stream_worker import __version__
from stream_worker.core.flags import ResultFlags, flag_summary, result_flags
from stream_worker.engine.uncertainty import Estimate

RESULT_FIELDS = (
    "teff", "e_teff", "logg", "e_logg", "fe_h", "e_fe_h",
    "raw_e_teff", "raw_e_logg", "raw_e_fe_h",
    "result_flags", "flag_warn", "flag_bad",
)
"""The science fields of every record, in the SDSS pipeline's names."""

PARAMETER_FIELDS = RESULT_FIELDS[:9]


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def result_record(
    spectrum_id: str,
    estimate: Estimate | None,
    weights_info,
    inference_seconds: float,
    error: BaseException | None = None,
) -> dict:
    """A record for one spectrum. Without an estimate (processing raised) the parameters are
    ``None`` and ``flag_runtime_exception`` is set, so a failure is never silent."""
    if estimate is None:
        flags = int(ResultFlags.RUNTIME_EXCEPTION)
        parameters = dict.fromkeys(PARAMETER_FIELDS)
    else:
        flags = int(result_flags(estimate.teff, estimate.logg, estimate.fe_h))
        parameters = {name: getattr(estimate, name) for name in PARAMETER_FIELDS}
    return {
        "spectrum_id": spectrum_id,
        **parameters,
        "result_flags": flags,
        **flag_summary(flags),
        "error_message": None if error is None else f"{type(error).__name__}: {error}",
        "model_name": weights_info.name,
        "model_trained": weights_info.trained,
        "weights_sha256": weights_info.sha256,
        "worker_version": __version__,
        "inference_seconds": inference_seconds,
        "processed_at": utc_now(),
    }
