"""Reading coadd and visit spectra out of apStar files (astropy).

apStar layout: HDU1 flux, HDU2 error (sigma, not ivar), HDU3 pixel mask, one row per spectrum.
Rows 0 and 1 are the two coadds; visit ``i`` (1-based, header ``SFILE{i}``) is row ``i + 1`` —
except in a single-visit file, where the visit is row 0 whatever the number of rows.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from stream_worker.core.grid import GRID_CDELT1, GRID_CRVAL1, N_PIXELS
from stream_worker.core.spectrum import InputError, Spectrum, ivar_from_error

MJD_FROM_JD = 2_400_000.5

# SDSS-V: .../apStar-{apred}-{telescope}-{obj}.fits; DR17: apStar-{apred}-{obj}.fits
_TELESCOPE_IN_NAME = re.compile(r"^apStar-[^-]+-(apo25m|lco25m|apo1m)-")


def _header_count(header: fits.Header, prefix: str) -> int:
    return sum(1 for key in header if re.fullmatch(rf"{prefix}\d+", key))


def visit_count(header: fits.Header) -> int:
    """Number of visits: ``NVISITS``, else the ``SFILE{i}`` keywords present."""
    return int(header.get("NVISITS", _header_count(header, "SFILE")))


def visit_row(visit: int, n_visits: int) -> int:
    """Row of 1-based visit ``visit`` in a file with ``n_visits`` visits."""
    if not 1 <= visit <= n_visits:
        raise InputError("no_such_visit", f"visit {visit} requested, but the file has visits 1..{n_visits}")
    return 0 if n_visits == 1 else visit + 1


def _check_grid(header: fits.Header, path: Path) -> None:
    found = (header.get("CRVAL1"), header.get("CDELT1"), header.get("NAXIS1"))
    if (
        found[0] is None
        or found[1] is None
        or not np.isclose(found[0], GRID_CRVAL1, atol=1e-9)
        or not np.isclose(found[1], GRID_CDELT1, rtol=1e-6, atol=0)
        or found[2] != N_PIXELS
    ):
        raise InputError(
            "wrong_grid",
            f"{path}: expected the apStar grid CRVAL1={GRID_CRVAL1}, CDELT1={GRID_CDELT1}, {N_PIXELS} pixels; "
            f"found CRVAL1={found[0]}, CDELT1={found[1]}, {found[2]} pixels",
        )


def _rows(data: np.ndarray | None, path: Path, hdu: int) -> np.ndarray:
    if data is None:
        raise InputError("not_apstar", f"{path}: HDU{hdu} holds no image data")
    return data.reshape(1, -1) if data.ndim == 1 else data


def read_apstar(path: str | os.PathLike, visits: bool = False) -> list[Spectrum]:
    """The coadd (row 0) of an apStar file, followed by each visit when ``visits`` is true."""
    wanted = ["coadd"]
    if visits:
        with _open(Path(path)) as hdul:
            wanted += list(range(1, visit_count(hdul[0].header) + 1))
    return read_apstar_spectra(path, wanted)


def read_apstar_spectra(path: str | os.PathLike, which: list) -> list[Spectrum]:
    """Spectra ``which`` (``"coadd"`` or 1-based visit numbers) from one apStar file."""
    path = Path(path)
    with _open(path) as hdul:
        try:
            primary = hdul[0].header
            _check_grid(hdul[1].header, path)
            flux = _rows(hdul[1].data, path, 1)
            error = _rows(hdul[2].data, path, 2)
            pixel_mask = _rows(hdul[3].data, path, 3) if len(hdul) > 3 else None
        except (IndexError, OSError, TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError("truncated_file", f"{path}: cannot read the flux and error HDUs: {exc}") from exc
        if flux.shape != error.shape:
            raise InputError("not_apstar", f"{path}: flux {flux.shape} and error {error.shape} differ in shape")
        n_visits = visit_count(primary)
        source_id = str(primary.get("OBJID") or path.stem.split("-", 2)[-1])
        telescope = primary.get("TELESCOP") or ((m := _TELESCOPE_IN_NAME.match(path.name)) and m.group(1))
        spectra = []
        for item in which:
            if item == "coadd":
                row, visit, mjd = 0, None, None
            else:
                visit = int(item)
                row = visit_row(visit, n_visits)
                jd = primary.get(f"JD{visit}")
                mjd = None if jd is None else float(jd) - MJD_FROM_JD
            if row >= flux.shape[0]:
                raise InputError("truncated_file", f"{path}: row {row} needed but the file has {flux.shape[0]} rows")
            spectra.append(
                Spectrum(
                    spectrum_id=f"{path.stem}:{'coadd' if visit is None else f'visit{visit}'}",
                    flux=flux[row].astype(np.float32),
                    ivar=ivar_from_error(error[row]),
                    source_id=source_id,
                    kind="coadd" if visit is None else "visit",
                    visit=visit,
                    telescope=telescope or None,
                    mjd=mjd,
                    origin=str(path),
                    pixel_mask=None if pixel_mask is None else pixel_mask[row].astype(np.int64),
                )
            )
    return spectra


def _open(path: Path) -> fits.HDUList:
    """Opens a file, turning every way it can be unreadable into an :class:`InputError`."""
    if not path.exists():
        raise InputError("missing_file", f"{path}: no such file")
    if not path.is_file():
        raise InputError("not_apstar", f"{path}: not a regular file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except OSError as exc:
        raise InputError("not_apstar", f"{path}: not a FITS file ({exc})") from exc
    except Exception as exc:
        raise InputError("truncated_file", f"{path}: unreadable FITS file ({exc})") from exc
    truncated = [str(w.message) for w in caught if "truncated" in str(w.message)]
    if truncated:
        hdul.close()
        raise InputError("truncated_file", f"{path}: {truncated[0]}")
    if len(hdul) < 3:
        hdul.close()
        raise InputError("not_apstar", f"{path}: {len(hdul)} HDUs, an apStar file has flux, error and mask HDUs")
    return hdul
