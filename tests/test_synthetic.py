"""The synthetic-spectrum generator: shapes, gaps, S/N, label box, reproducibility."""

import numpy as np
import pytest
import torch

from devtools.synthetic import DR17_GAPS, EMULATOR_PIXELS, SpectrumGenerator, load_emulator
from stream_worker.core.grid import N_PIXELS
from stream_worker.engine.preprocess import network_inputs


@pytest.fixture(scope="module")
def generator():
    return SpectrumGenerator()


@pytest.fixture(scope="module")
def spectra(generator):
    return generator.generate(24, (20.0, 300.0), seed=5)


def test_emulator_pixels_are_the_documented_apstar_indices():
    assert len(EMULATOR_PIXELS) == 7214
    assert np.array_equal(EMULATOR_PIXELS, np.r_[322:3242, 3648:6048, 6412:8306])


def test_emulator_follows_the_published_formula():
    emulator = load_emulator("giants")
    labels = np.array([4800.0, 2.5, -0.2, 0.1, 5.0])
    x = (labels - emulator.x_min) / (emulator.x_max - emulator.x_min) - 0.5
    i = 1234
    hidden = 1 / (1 + np.exp(-(emulator.w0[i] @ x + emulator.b0[i])))
    assert emulator(labels)[0, i] == pytest.approx(hidden @ emulator.w1[i] + emulator.b1[i], rel=1e-5)
    assert emulator(labels).max() <= 1.1


def test_shapes_and_dtypes(spectra):
    assert spectra.flux.shape == spectra.ivar.shape == (24, N_PIXELS)
    assert spectra.flux.dtype == spectra.ivar.dtype == np.float32
    assert spectra.labels.shape == (24, 5)


def test_chip_gaps_are_nan_or_zero_with_ivar_zero(spectra):
    gap = ~np.isfinite(spectra.error)
    assert np.all(spectra.ivar[gap] == 0)
    assert np.all(np.isnan(spectra.flux[gap]) | (spectra.flux[gap] == 0))
    assert np.isnan(spectra.flux).any() and (spectra.flux[gap] == 0).any()  # coadd-style and visit-style rows
    for start, stop in DR17_GAPS:  # the middle of every DR17 gap is a gap in every spectrum
        middle = slice(start + 5 if start else 0, stop - 5 if stop < N_PIXELS else N_PIXELS)
        assert gap[:, middle].all()
    assert 0.07 < gap.mean() < 0.11  # DR17: ~9 %
    assert np.all(np.isfinite(spectra.flux[~gap])) and np.all(spectra.ivar[~gap] > 0)


def test_bad_pixels_have_huge_errors_beside_the_gaps(spectra):
    bad = np.isfinite(spectra.error) & (spectra.error >= 1e10)
    assert bad.sum(axis=1).min() >= 6  # at least a run beside each of the six inner gap edges
    assert np.all(spectra.ivar[bad] < 1e-19)


@pytest.mark.parametrize("snr", [20, 50, 100, 200])
def test_snr_is_achieved_within_ten_percent(generator, snr):
    achieved = generator.generate(8, float(snr), seed=snr).achieved_snr()
    assert np.all(np.abs(achieved / snr - 1) < 0.10), achieved


def test_labels_lie_in_the_emulator_box(generator):
    labels, dwarf = generator.draw_labels(2000, np.random.default_rng(1))
    assert generator.inside_box(labels, dwarf).all()
    assert 0.25 < dwarf.mean() < 0.45
    giants, dwarfs = labels[~dwarf], labels[dwarf]
    assert giants[:, 1].max() < 4.0 and dwarfs[:, 1].min() >= 4.0  # two populations, no overlap
    assert giants[:, 0].min() >= 3884 and dwarfs[:, 0].max() <= 7000
    # a main sequence: cooler dwarfs have higher log g
    assert np.median(dwarfs[dwarfs[:, 0] < 5000, 1]) > np.median(dwarfs[dwarfs[:, 0] > 6000, 1]) + 0.15


def test_reproducible_with_a_seed(generator):
    a = generator.generate(3, 50.0, seed=11)
    b = generator.generate(3, 50.0, seed=11)
    c = generator.generate(3, 50.0, seed=12)
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.ivar, b.ivar)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_given_labels_are_used(generator):
    labels = np.array([[5100.0, 4.6, -0.2, 0.05, 4.0]])
    s = generator.generate(1, 100.0, seed=0, labels=labels, dwarf=np.array([True]))
    np.testing.assert_array_equal(s.labels, labels)


def test_continuum_level_and_shape_like_dr17(generator):
    """Median flux of the DR17 files (~650-850) is well inside the simulated level range, and
    the continuum varies by tens of percent across the spectrum, not orders of magnitude."""
    continua = generator.continuum(400, np.random.default_rng(2))
    levels = np.median(continua, axis=1)
    assert np.quantile(levels, 0.1) < 650 and np.quantile(levels, 0.9) > 850
    ratio = continua.max(axis=1) / continua.min(axis=1)
    assert np.median(ratio) < 1.6 and ratio.min() > 1.02


def test_spectra_go_through_the_inference_preprocessing(spectra):
    noise = torch.randn(2, N_PIXELS)
    clean, noisy = network_inputs(spectra.flux[0], spectra.ivar[0], noise)
    assert clean.shape == (1, 1, N_PIXELS) and noisy.shape == (2, 1, N_PIXELS)
    assert torch.isfinite(clean).all() and torch.isfinite(noisy).all()


def test_sky_line_residuals_like_dr17(spectra):
    """DR17 spectra show 5-45 narrow flux spikes (>1.3x the local level) with large errors."""
    flux = np.where(np.isfinite(spectra.error) & (spectra.error < 1e5), spectra.model_flux, np.nan)
    level = np.nanmedian(flux, axis=1, keepdims=True)
    spikes = np.nansum(flux > 1.6 * level, axis=1)
    assert np.median(spikes) >= 3 and spikes.max() < 400
    assert np.nanmax(flux / level) < 12
