import numpy as np
import pytest
import torch

from stream_worker.engine import preprocess
from stream_worker.engine.preprocess import (
    clean_flux,
    clip_by_selection,
    clip_level,
    errors_from_ivar,
    log_scale,
    network_inputs,
    noise_draws,
    spectrum_seed,
    torch_rank_convention,
)

L = 8575


def error_from_ivar(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """One spectrum's errors through the engine's batched computation."""
    return errors_from_ivar(clean_flux(flux[None]), torch.from_numpy(ivar[None]))[0].numpy()


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


@pytest.mark.parametrize("n", [1, 2, 20, 8575, 20 * 8575, 20 * 8575 + 3])
def test_the_clip_level_by_selection_is_torch_quantile_bit_for_bit(n):
    """Two order statistics and torch's interpolation give torch.quantile's value exactly, without
    sorting the 171,500 values of a spectrum's draws."""
    torch.manual_seed(n)
    x = torch.randn(3, n) * 3 + 5
    x[1, : n // 2] = 1.0  # ties
    assert torch.equal(clip_level(x), torch.quantile(x, 0.95, dim=-1, keepdim=True))
    x[2, -1] = float("nan")
    assert torch.isnan(clip_level(x)[2]).all() and torch.isnan(torch.quantile(x, 0.95, dim=-1)[2])


def quantile_ranked_in(rank_dtype):
    """``torch.quantile`` of float32 values as a torch computes it whose rank q·(n−1) is taken in
    ``rank_dtype`` (float64 from float32 q: torch 2.15; float32: torch 2.11, the GPU image's)."""
    def quantile(x, q, dim=-1, keepdim=True):
        n = x.shape[-1]
        rank = rank_dtype(np.float32(q)) * rank_dtype(n - 1)
        below = int(rank)
        ordered = torch.sort(x, dim=-1).values
        return torch.lerp(ordered[..., below : below + 1], ordered[..., below + 1 : below + 2],
                          float(np.float32(rank - below)))
    return quantile


@pytest.mark.parametrize("rank_dtype, convention", [(np.float64, "double"), (np.float32, "float32")])
def test_the_clip_level_follows_how_the_running_torch_ranks(rank_dtype, convention):
    """torch 2.11 and 2.15 give quantiles that differ in the last bits (the rank in float32 or in
    double): the engine asks the torch it runs on which, so its clip stays torch.quantile's on
    the GPU machines' torch as on this one (tests/test_preprocess.py passes under both)."""
    quantile = quantile_ranked_in(rank_dtype)
    assert torch_rank_convention(quantile) == convention
    torch.manual_seed(1)
    x = torch.randn(64, 20 * 8575) * 3 + 5
    assert torch.equal(clip_by_selection(x, convention), quantile(x, 0.95))
    other = "float32" if convention == "double" else "double"
    assert not torch.equal(clip_by_selection(x, other), quantile(x, 0.95))


def test_under_a_torch_of_another_quantile_the_clip_level_is_torch_quantile_itself(monkeypatch):
    assert torch_rank_convention(lambda x, q, dim, keepdim: torch.zeros(x.shape[0], 1)) is None
    monkeypatch.setattr(preprocess, "_running_rank_convention", lambda: None)
    x = torch.randn(3, 500)
    x[2, 7] = float("nan")
    assert torch.equal(clip_level(x)[:2], torch.quantile(x, 0.95, dim=-1, keepdim=True)[:2])
    assert torch.isnan(clip_level(x)[2]).all()


def test_a_spectrum_without_positive_ivar_falls_back_to_a_tenth_of_the_median_flux():
    flux, ivar = spectrum(ivar_value=-1.0, flux_value=300.0)
    ivar[::2] = -0.0
    assert np.allclose(error_from_ivar(flux, ivar), 30.0)


def numpy_error(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """The host-side numpy computation the engine ran before preprocessing moved to the device."""
    ivar = np.asarray(ivar)
    ivar = ivar if ivar.dtype in (np.float32, np.float64) else ivar.astype(np.float32)
    informative = np.nan_to_num(ivar)
    informative[~(informative > 0)] = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        error = np.divide(ivar.dtype.type(1), informative) ** ivar.dtype.type(0.5)
        if np.isinf(error).all():
            error = np.full_like(error, 0.1 * float(np.median(np.nan_to_num(flux.astype(np.float32), nan=0.0))))
        limit = ivar.dtype.type(5.0) * np.nanmedian(error[~np.isinf(error)])
        error = np.clip(error, None, limit)
        return np.where(np.isnan(error), limit, error).astype(np.float32)


def test_device_preprocessing_gives_the_bits_the_host_numpy_code_gave():
    """Records on a CPU did not change when preprocessing moved into torch: the same network
    inputs, bit for bit, for ordinary, +inf, negative, NaN, all-zero and float64 ivar."""
    from tests.helpers import synthetic_spectra

    flux, ivar = synthetic_spectra(6, seed=3)
    ivar[1, 100:200] = np.inf
    ivar[2, :] = 0
    ivar[3, ::3] = -1
    ivar[4, 50] = np.nan
    rows = [ivar[0], ivar[1], ivar[2], ivar[3], ivar[4].astype(np.float64) * 1.0000001, ivar[5]]
    noise = torch.stack([noise_draws(str(i), 0, 20, L) for i in range(6)])
    clean, noisy = network_inputs(flux, rows, noise)
    flux32 = torch.from_numpy(np.nan_to_num(flux.astype(np.float32), nan=0.0))
    error = torch.from_numpy(np.stack([numpy_error(f, v) for f, v in zip(flux, rows)]))
    expected = flux32[:, None, :] + error[:, None, :] * noise
    logged = torch.log(torch.clamp(expected, min=1e-6)).reshape(6, -1)
    expected = torch.minimum(logged, torch.quantile(logged, 0.95, dim=-1, keepdim=True) + 1).reshape(6, 20, 1, L)
    assert torch.equal(noisy, expected)
    logged = torch.log(torch.clamp(flux32, min=1e-6))
    assert torch.equal(clean[:, 0], torch.minimum(logged, torch.quantile(logged, 0.95, dim=-1, keepdim=True) + 1))
