import numpy as np
import pytest
import torch

from stream_worker.engine.preprocess import (
    clean_flux,
    error_from_ivar,
    log_scale,
    network_inputs,
    noise_draws,
    spectrum_seed,
)

L = 8575


def spectrum(ivar_value=1e-2, flux_value=100.0):
    return np.full(L, flux_value, np.float32), np.full(L, ivar_value, np.float32)


def test_nan_flux_becomes_zero():
    flux = np.array([1.0, np.nan, 3.0], np.float32)
    assert clean_flux(flux).tolist() == [1.0, 0.0, 3.0]


def test_error_is_inverse_sqrt_ivar():
    flux, ivar = spectrum(ivar_value=4.0)
    assert np.allclose(error_from_ivar(flux, ivar), 0.5)


@pytest.mark.parametrize("bad", [0.0, np.nan, -np.inf, -3.0])
def test_uninformative_pixels_get_five_times_the_median_error(bad):
    flux, ivar = spectrum(ivar_value=4.0)
    ivar[:10] = bad
    error = error_from_ivar(flux, ivar)
    assert np.all(error[:10] == np.float32(2.5))
    assert np.all(error[10:] == np.float32(0.5))


def test_infinite_ivar_gives_the_pipelines_tiny_error():
    """As sdss/astra: nan_to_num turns ivar=+inf into float32's largest number, so the error is
    (1/3.4e38)**0.5 = 5.4e-20, the pixel counts in the median and its noise adds nothing."""
    flux, ivar = spectrum(ivar_value=4.0)
    ivar[:10] = np.inf
    error = error_from_ivar(flux, ivar)
    assert np.all(error[:10] == np.float32(1 / np.finfo(np.float32).max) ** np.float32(0.5))
    assert 0 < error[0] < 1e-19
    assert np.all(error[10:] == np.float32(0.5))


def test_error_arithmetic_follows_the_ivar_dtype():
    """The pipeline computes the error in the input's dtype and casts to float32 at the end: a
    float64 ivar of +inf gives (1/1.8e308)**0.5 = 7.5e-155, which is 0 in float32; an ordinary
    float64 ivar gives the correctly rounded float32 of its float64 error."""
    flux, ivar32 = spectrum(ivar_value=4.0)
    ivar = ivar32.astype(np.float64)
    ivar[:3] = [np.inf, 3.0, 7.0]
    error = error_from_ivar(flux, ivar)
    assert error.dtype == np.float32 and error[0] == 0
    assert error[1] == np.float32(3.0 ** -0.5) and error[2] == np.float32(7.0 ** -0.5)
    as_float32 = error_from_ivar(flux, ivar.astype(np.float32))
    assert as_float32[0] > 0  # the same values in float32 do differ


def test_large_errors_are_clipped_at_five_times_the_median():
    flux, ivar = spectrum(ivar_value=4.0)
    ivar[:5] = 1e-12  # error 1e6
    assert error_from_ivar(flux, ivar)[:5].max() == np.float32(2.5)


def test_all_zero_ivar_uses_a_tenth_of_the_median_flux():
    flux, ivar = spectrum(ivar_value=0.0, flux_value=300.0)
    flux[:100] = np.nan  # nan flux counts as 0 in the median, as in the pipeline
    assert np.allclose(error_from_ivar(flux, ivar), 30.0)


def test_error_is_float32():
    flux, ivar = spectrum()
    assert error_from_ivar(flux, ivar).dtype == np.float32


def test_log_scale_floors_zero_and_negative_flux():
    x = torch.tensor([[0.0, -5.0] + [1.0] * 98])
    out = log_scale(x)
    assert out[0, 0] == pytest.approx(np.log(1e-6)) and out[0, 1] == pytest.approx(np.log(1e-6))


def test_log_scale_clips_at_95th_percentile_plus_one_per_spectrum():
    quiet = torch.ones(1, 100)
    loud = torch.ones(1, 100)
    loud[0, -1] = 1e9
    out = log_scale(torch.cat([quiet, loud]))
    assert torch.all(out[0] == 0)  # the loud spectrum does not change the quiet one's ceiling
    assert out[1, -1] == pytest.approx(1.0)  # log(1) quantile 0 + 1


def test_log_scale_over_draws_takes_one_quantile_for_all_draws():
    draws = torch.stack([torch.full((100,), 1.0), torch.full((100,), float(np.e**4))])
    together = log_scale(draws, dims=2)
    # the 95% quantile of all 200 values is 4, so nothing is clipped
    assert together[1, 0] == pytest.approx(4.0)
    separately = log_scale(draws, dims=1)
    assert separately[1, 0] == pytest.approx(4.0)
    batch = log_scale(torch.stack([draws, draws * 0 + 1]), dims=2)
    assert torch.equal(batch[0], together)


def test_quantile_matches_numpy_linear_interpolation():
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 1000, (3, 777)).astype(np.float32)
    expected = np.minimum(np.log(x), np.quantile(np.log(x), 0.95, axis=1, keepdims=True) + 1)
    assert np.allclose(log_scale(torch.from_numpy(x)).numpy(), expected, rtol=1e-6)


def test_noise_is_reproducible_per_spectrum_and_differs_between_spectra():
    a = noise_draws("2M000:coadd", 7, 20, L)
    assert a.shape == (20, L) and a.dtype == torch.float32
    assert torch.equal(a, noise_draws("2M000:coadd", 7, 20, L))
    assert not torch.equal(a, noise_draws("2M000:visit1", 7, 20, L))
    assert not torch.equal(a, noise_draws("2M000:coadd", 8, 20, L))
    assert spectrum_seed(7, "x") < 2**63


def test_network_inputs_shapes():
    flux, ivar = spectrum()
    clean, noisy = network_inputs(flux, ivar, noise_draws("a", 0, 5, L))
    assert clean.shape == (1, 1, L) and noisy.shape == (5, 1, L)
    clean, noisy = network_inputs(flux, ivar, None)
    assert noisy is None


def test_a_stack_gives_what_each_spectrum_gives_alone():
    rng = np.random.default_rng(3)
    flux = rng.uniform(50, 150, (3, L)).astype(np.float32)
    ivar = rng.uniform(0.01, 1, (3, L)).astype(np.float32)
    noise = torch.stack([noise_draws(str(i), 0, 4, L) for i in range(3)])
    clean, noisy = network_inputs(flux, ivar, noise)
    assert clean.shape == (3, 1, L) and noisy.shape == (3, 4, 1, L)
    for i in range(3):
        alone_clean, alone_noisy = network_inputs(flux[i], ivar[i], noise[i])
        assert torch.equal(clean[i], alone_clean[0]) and torch.equal(noisy[i], alone_noisy)
