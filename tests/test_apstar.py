import numpy as np
import pytest
from astropy.io import fits

from stream_worker.core.spectrum import InputError, Spectrum, ivar_from_error, validate_spectrum
from stream_worker.io.apstar import read_apstar, read_apstar_spectra, visit_row
from tests.helpers import DWARF_FILE, GIANT_FILE


def test_three_visit_file_gives_coadd_and_visits_from_the_right_rows():
    spectra = read_apstar(GIANT_FILE, visits=True)
    assert [s.spectrum_id for s in spectra] == [
        "apStar-dr17-2M17335483-2753043:coadd",
        "apStar-dr17-2M17335483-2753043:visit1",
        "apStar-dr17-2M17335483-2753043:visit2",
        "apStar-dr17-2M17335483-2753043:visit3",
    ]
    with fits.open(GIANT_FILE) as hdul:
        raw_flux = hdul[1].data
    np.testing.assert_array_equal(spectra[0].flux, raw_flux[0].astype(np.float32))
    for visit in (1, 2, 3):
        np.testing.assert_array_equal(spectra[visit].flux, raw_flux[visit + 1].astype(np.float32))
    assert spectra[1].kind == "visit" and spectra[1].visit == 1
    assert spectra[1].mjd == pytest.approx(2456396.99199 - 2400000.5)
    assert spectra[0].source_id == "2M17335483-2753043"


def test_real_dr17_features_survive_reading():
    coadd = read_apstar(GIANT_FILE)[0]
    assert coadd.flux.shape == (8575,) and coadd.flux.dtype == np.float32
    gaps = np.isnan(coadd.flux)
    assert 0.05 < gaps.mean() < 0.15  # chip gaps are NaN in DR17
    assert np.all(coadd.ivar[gaps] == 0)
    assert coadd.pixel_mask is not None and coadd.pixel_mask.shape == (8575,)


def test_single_visit_file_takes_the_visit_from_row_zero():
    spectra = read_apstar(DWARF_FILE, visits=True)
    assert [s.spectrum_id.split(":")[1] for s in spectra] == ["coadd", "visit1"]
    np.testing.assert_array_equal(spectra[0].flux, spectra[1].flux)
    assert np.nanmedian(spectra[1].flux) > 100  # row 1 of this file is empty


def test_visit_row_rule():
    assert visit_row(1, 1) == 0
    assert visit_row(1, 3) == 2 and visit_row(3, 3) == 4
    with pytest.raises(InputError, match="visits 1..3") as info:
        visit_row(4, 3)
    assert info.value.reason == "no_such_visit"


def test_error_becomes_ivar_with_bad_errors_as_zero():
    ivar = ivar_from_error(np.array([2.0, 0.0, np.nan, np.inf, -1.0, 1e10]))
    assert ivar.tolist()[:5] == [0.25, 0.0, 0.0, 0.0, 0.0]
    assert ivar[5] == pytest.approx(1e-20)


def test_ivar_is_computed_in_the_errors_dtype():
    """apStar errors are float64 (big-endian in the file): their ivar stays float64, as the
    pipeline's does; a float32 error whose square underflows keeps ivar +inf (a noise-free pixel)."""
    wide = ivar_from_error(np.array([3.0, 1e-200], dtype=">f8"))
    assert wide.dtype == np.float64 and wide[0] == 1 / 9.0 and wide[1] == np.inf
    narrow = ivar_from_error(np.array([3.0, 1e-25], dtype=np.float32))
    assert narrow.dtype == np.float32 and narrow[0] == np.float32(1) / np.float32(9) and narrow[1] == np.inf
    (coadd,) = read_apstar(GIANT_FILE)
    assert coadd.flux.dtype == np.float32 and coadd.ivar.dtype == np.float64


def reason(path, which=("coadd",)):
    with pytest.raises(InputError) as info:
        read_apstar_spectra(path, list(which))
    return info.value.reason, str(info.value)


def test_missing_file(tmp_path):
    assert reason(tmp_path / "nope.fits")[0] == "missing_file"


def test_directory_and_non_fits(tmp_path):
    assert reason(tmp_path)[0] == "not_apstar"
    (tmp_path / "x.fits").write_text("hello, not FITS")
    assert reason(tmp_path / "x.fits")[0] == "not_apstar"


def test_wrong_grid(tmp_path):
    with fits.open(GIANT_FILE) as hdul:
        hdul[1].header["CRVAL1"] = 4.18
        hdul.writeto(tmp_path / "shifted.fits")
    code, message = reason(tmp_path / "shifted.fits")
    assert code == "wrong_grid" and "CRVAL1=4.18" in message


def test_wrong_length(tmp_path):
    hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(np.ones((2, 100))) for _ in range(3)]
    for hdu in hdus[1:]:
        hdu.header["CRVAL1"], hdu.header["CDELT1"] = 4.179, 6e-6
    fits.HDUList(hdus).writeto(tmp_path / "short.fits")
    code, message = reason(tmp_path / "short.fits")
    assert code == "wrong_grid" and "100 pixels" in message


@pytest.mark.parametrize("keep", [0.3, 0.7, 0.999])
def test_truncated_file(tmp_path, keep):
    raw = GIANT_FILE.read_bytes()
    (tmp_path / "cut.fits").write_bytes(raw[: int(len(raw) * keep)])
    code, message = reason(tmp_path / "cut.fits")
    assert code == "truncated_file", message


def test_validation_rejects_what_would_be_silently_wrong():
    good = Spectrum("a", np.ones(8575), np.ones(8575))
    assert validate_spectrum(good).flux.dtype == np.float32
    cases = {
        "wrong_shape": Spectrum("a", np.ones(100), np.ones(100)),
        "all_nan_flux": Spectrum("a", np.full(8575, np.nan), np.ones(8575)),
        "wrong_dtype": Spectrum("a", np.array(["x"] * 8575), np.ones(8575)),
        "invalid_field": Spectrum("", np.ones(8575), np.ones(8575)),
    }
    for code, spectrum in cases.items():
        with pytest.raises(InputError) as info:
            validate_spectrum(spectrum)
        assert info.value.reason == code
    with pytest.raises(InputError, match="coadd"):
        validate_spectrum(Spectrum("a", np.ones(8575), np.ones(8575), kind="stack"))
