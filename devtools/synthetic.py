"""Realistic synthetic apStar spectra with known labels, for training and testing APOGEENet.

A star's labels ``(Teff, log g, [Fe/H], [Mg/Fe], vmacro)`` go through a data-driven spectral
emulator (binspec_plus for giants, its dwarf variant for main-sequence stars) that gives the
continuum-normalised spectrum on APOGEE's 7214-pixel grid. That is placed on the 8575-pixel apStar
grid, multiplied by a realistic un-normalised continuum and given noise from a realistic error
spectrum at a chosen S/N, with chip gaps and bad pixels like the DR17 files in ``tests/data``:

* Chip gaps: flux NaN (coadd rows) or 0 (visit rows), ivar 0. The gap edges move by a few pixels
  from star to star, around the DR17 coadds' ``[0:201] [3320:3537] [6126:6295] [8378:8575]``.
* The DR17 files have real data on ~650 pixels just outside the emulator's three segments
  (``[322:3242] [3648:6048] [6412:8306]``). Those pixels get a *decoy*: the mirrored emulated
  spectrum of another, unrelated star, so a network learns they carry no information about
  this star instead of learning a featureless or empty region that real data never show.
* Continuum (measured on the DR17 coadds: per-chip levels within ~15 % of each other, curved by
  up to ~10 % within a chip, a blue-to-red decline of 0-20 %): a log-normal overall level
  (median 400, sigma 1.2 in ln, i.e. 1e-17 erg/s/cm2/AA levels from ~40 to ~4000), times
  ``exp(global tilt + per-chip offset, slope and curvature + a weak ripple)``.
* Night-sky line residuals (random positions, the apStar grid being the star's rest frame):
  narrow spikes of flux, mostly positive, up to several times the continuum, where the error is
  also ~10-50 times larger, as in the DR17 visits and coadds.
* Error: photon noise ``sqrt(flux + floor)`` with a per-chip gain and the sky lines, scaled
  so that the median per-pixel S/N of the noise-free flux is the requested S/N (the DR17
  header ``SNR`` is the median S/N per apStar pixel). The runs of pixels next to each chip gap
  and a few short runs inside the chips carry errors of 1e10-1e13, as in DR17; their flux is
  left smooth (DR17 interpolates it).

Labels come from a realistic prior inside the emulators' validity boxes: giants from 40,000
real DR17 red-giant ``(Teff, [Fe/H], [alpha/Fe])`` triples with log g from the tiny ANN shipped
beside them; dwarfs from a main-sequence locus (see :func:`dwarf_labels`). Everything is
reproducible from one seed. Data files and their provenance: ``devtools/data/README.md``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream_worker.core.grid import N_PIXELS

LABEL_NAMES = ("teff", "logg", "fe_h", "mg_fe", "vmacro")
"""Columns of every label array here (the emulators' input order)."""

EMULATOR_PIXELS = np.r_[322:3242, 3648:6048, 6412:8306]
"""Index on the 8575-pixel apStar grid of each of the emulators' 7214 pixels."""

SEGMENTS = ((322, 3242), (3648, 6048), (6412, 8306))
"""The emulated ranges of the three chips on the apStar grid."""

DR17_GAPS = ((0, 201), (3320, 3537), (6126, 6295), (8378, N_PIXELS))
"""Chip gaps (NaN flux) of the DR17 coadds in tests/data; synthetic gaps jitter around these."""

CHIPS = ((0, 3320), (3537, 6126), (6295, N_PIXELS))
"""Pixel ranges of the blue, green and red detectors (for the continuum and the error gains)."""

EMULATED_MAX = 1.1
"""Normalised emulated flux is clipped at this: a few pixels overshoot (up to ~2) at box corners."""

BAD_ERROR = (1e10, 1e13)
"""Range of the error of bad pixels, as in DR17."""

DATA = Path(__file__).with_name("data")


# --------------------------------------------------------------------------- emulators


@dataclass(frozen=True)
class Emulator:
    """A binspec-style one-hidden-layer network per pixel: labels → normalised flux (7214)."""

    w0: np.ndarray  # (7214, H, 5)
    b0: np.ndarray  # (7214, H)
    w1: np.ndarray  # (7214, H)
    b1: np.ndarray  # (7214,)
    x_min: np.ndarray  # (5,)
    x_max: np.ndarray  # (5,)

    @classmethod
    def load(cls, path) -> Emulator:
        with np.load(path) as d:
            return cls(
                d["w_array_0"].astype(np.float32), d["b_array_0"].astype(np.float32),
                d["w_array_1"].astype(np.float32), d["b_array_1"].astype(np.float32),
                d["x_min"].astype(np.float64), d["x_max"].astype(np.float64),
            )

    def inside(self, labels: np.ndarray) -> np.ndarray:
        """Which rows of ``labels (N, 5)`` lie in the emulator's validity box."""
        labels = np.atleast_2d(labels)
        return np.all((labels >= self.x_min) & (labels <= self.x_max), axis=1)

    def __call__(self, labels: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Normalised spectra ``(N, 7214)`` float32, clipped to ``[0, EMULATED_MAX]``."""
        labels = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        x = ((labels - self.x_min) / (self.x_max - self.x_min) - 0.5).astype(np.float32)
        out = np.empty((len(x), self.w0.shape[0]), np.float32)
        for start in range(0, len(x), chunk):
            z = np.einsum("ijk,nk->nij", self.w0, x[start : start + chunk], optimize=True) + self.b0
            hidden = 0.5 * (np.tanh(0.5 * z) + 1)  # the logistic sigmoid, without overflow warnings
            out[start : start + chunk] = np.einsum("nij,ij->ni", hidden, self.w1, optimize=True) + self.b1
        return np.clip(out, 0.0, EMULATED_MAX, out=out)


@functools.lru_cache(maxsize=4)
def load_emulator(name: str = "giants", data_dir: str | None = None) -> Emulator:
    """``"giants"`` → binspec_plus (Teff 3884-7895, log g 1.24-4.71); ``"dwarfs"`` → the dwarf
    emulator (Teff 4200-7000, log g 4.0-4.98)."""
    filename = {
        "giants": "binspec_plus_NN_normalized_spectra.npz",
        "dwarfs": "binspec_dwarfs_NN_normalized_spectra.npz",
    }[name]
    base = Path(data_dir) if data_dir else DATA
    return Emulator.load(base / filename)


# --------------------------------------------------------------------------- label prior


@functools.lru_cache(maxsize=2)
def _giant_table(data_dir: str | None = None) -> np.ndarray:
    """Real DR17 giant labels ``(N, 4)``: Teff, log g (from the shipped ANN), [Fe/H], [alpha/Fe]."""
    base = Path(data_dir) if data_dir else DATA
    with np.load(base / "dr17_giant_labels.npz") as d:
        triples = d["training_labels"].astype(np.float64)  # teff, feh, alpha
        x = (triples - d["xmin"]) / (d["xmax"] - d["xmin"]) - 0.5
        hidden = x
        for layer in (0, 2):
            hidden = hidden @ d[f"features.{layer}.weight"].T + d[f"features.{layer}.bias"]
            hidden = np.where(hidden > 0, hidden, 0.01 * hidden)  # leaky ReLU, slope 0.01
        logg = (hidden @ d["features.4.weight"].T + d["features.4.bias"])[:, 0]
    return np.column_stack([triples[:, 0], logg, triples[:, 1], triples[:, 2]])


def giant_labels(n: int, rng: np.random.Generator, data_dir: str | None = None) -> np.ndarray:
    """``(n, 5)`` giant labels: real DR17 red-giant labels, jittered a little (20 K, 0.03 dex,
    0.02 dex) so no two stars are identical, and a log-normal vmacro; all inside the
    binspec_plus box."""
    table = _giant_table(data_dir)
    box = load_emulator("giants", data_dir)
    out = np.empty((0, 5))
    while len(out) < n:
        rows = table[rng.integers(0, len(table), 2 * (n - len(out)) + 16)]
        jitter = rng.normal(0, [20.0, 0.03, 0.02, 0.02], rows.shape)
        vmacro = np.exp(rng.normal(np.log(5.0), 0.35, (len(rows), 1)))
        labels = np.column_stack([rows + jitter, vmacro])
        out = np.vstack([out, labels[box.inside(labels)]])
    return out[:n]


DWARF_LOCUS_TEFF = np.array([4200.0, 4800.0, 5500.0, 6200.0, 7000.0])
DWARF_LOCUS_ZAMS_LOGG = np.array([4.78, 4.70, 4.58, 4.45, 4.30])
DWARF_LOCUS_SPREAD = np.array([0.10, 0.15, 0.30, 0.40, 0.40])


def dwarf_labels(n: int, rng: np.random.Generator, data_dir: str | None = None) -> np.ndarray:
    """``(n, 5)`` main-sequence labels inside the dwarf emulator's box.

    Teff uniform in 4250-6950 K; log g below a zero-age main-sequence envelope (4.78 at 4200 K to
    4.30 at 7000 K) by an evolutionary offset up to 0.1 dex for K dwarfs and 0.4 dex for F stars
    (skewed towards the ZAMS), plus 0.03 dex scatter, kept in 4.0-4.95; [Fe/H] ~ N(-0.1, 0.25);
    [Mg/Fe] the thin/thick-disc trend ``-0.2 [Fe/H] + N(0.02, 0.05)``; vmacro log-normal
    (median 4 km/s, wider than giants': rotation).
    """
    box = load_emulator("dwarfs", data_dir)
    out = np.empty((0, 5))
    while len(out) < n:
        m = 2 * (n - len(out)) + 16
        teff = rng.uniform(4250, 6950, m)
        zams = np.interp(teff, DWARF_LOCUS_TEFF, DWARF_LOCUS_ZAMS_LOGG)
        spread = np.interp(teff, DWARF_LOCUS_TEFF, DWARF_LOCUS_SPREAD)
        logg = np.clip(zams - spread * rng.uniform(0, 1, m) ** 1.5 + rng.normal(0, 0.03, m), 4.02, 4.95)
        fe_h = np.clip(rng.normal(-0.1, 0.25, m), -0.75, 0.35)
        mg_fe = np.clip(-0.2 * fe_h + rng.normal(0.02, 0.05, m), -0.25, 0.45)
        vmacro = np.clip(np.exp(rng.normal(np.log(4.0), 0.5, m)), 0.5, 30.0)
        labels = np.column_stack([teff, logg, fe_h, mg_fe, vmacro])
        out = np.vstack([out, labels[box.inside(labels)]])
    return out[:n]


# --------------------------------------------------------------------------- generator


@dataclass
class SyntheticSpectra:
    """Spectra on the apStar grid with their true labels.

    ``flux`` and ``ivar`` (float32, ``(N, 8575)``) are what an apStar row gives after
    :func:`stream_worker.core.spectrum.ivar_from_error`; ``model_flux`` is the noise-free flux (NaN in
    the gaps) and ``error`` the 1-sigma error (inf in the gaps, 1e10+ at bad pixels).
    """

    flux: np.ndarray
    ivar: np.ndarray
    labels: np.ndarray
    snr: np.ndarray
    dwarf: np.ndarray
    model_flux: np.ndarray
    error: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def achieved_snr(self) -> np.ndarray:
        """Median ``flux / error`` over the good pixels of each noisy spectrum (the DR17 SNR)."""
        good = np.isfinite(self.error) & (self.error < 1e5)
        ratio = np.where(good, self.flux / np.where(good, self.error, 1), np.nan)
        return np.nanmedian(ratio, axis=1)


class SpectrumGenerator:
    """Labels → realistic apStar-like spectra. ``dwarf_fraction`` of the stars are drawn from
    the main-sequence locus (dwarf emulator), the rest from the DR17 giant prior (binspec_plus)."""

    def __init__(self, dwarf_fraction: float = 0.35, data_dir: str | None = None) -> None:
        self.dwarf_fraction = float(dwarf_fraction)
        self.data_dir = data_dir
        self.giants = load_emulator("giants", data_dir)
        self.dwarfs = load_emulator("dwarfs", data_dir)

    # labels -----------------------------------------------------------------
    def draw_labels(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (n, 5), dwarf (n,) bool)`` in random order."""
        dwarf = rng.uniform(size=n) < self.dwarf_fraction
        labels = np.empty((n, 5))
        labels[dwarf] = dwarf_labels(int(dwarf.sum()), rng, self.data_dir)
        labels[~dwarf] = giant_labels(int((~dwarf).sum()), rng, self.data_dir)
        return labels, dwarf

    def inside_box(self, labels: np.ndarray, dwarf: np.ndarray) -> np.ndarray:
        """Whether each star's labels lie in the validity box of the emulator that made it."""
        return np.where(dwarf, self.dwarfs.inside(labels), self.giants.inside(labels))

    def emulate(self, labels: np.ndarray, dwarf: np.ndarray) -> np.ndarray:
        """Normalised emulated spectra ``(N, 7214)``."""
        out = np.empty((len(labels), len(EMULATOR_PIXELS)), np.float32)
        if dwarf.any():
            out[dwarf] = self.dwarfs(labels[dwarf])
        if (~dwarf).any():
            out[~dwarf] = self.giants(labels[~dwarf])
        return out

    # spectra ----------------------------------------------------------------
    def normalised(self, labels: np.ndarray, dwarf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Normalised spectra on the apStar grid ``(N, 8575)``: emulated pixels, decoy edges
        (mirrored spectrum of an unrelated star), NaN gaps with edges jittered by ±4 pixels."""
        n = len(labels)
        out = np.full((n, N_PIXELS), np.nan, np.float32)
        out[:, EMULATOR_PIXELS] = self.emulate(labels, dwarf)
        decoy_labels, decoy_dwarf = self.draw_labels(n, rng)
        decoy = np.full((n, N_PIXELS), np.nan, np.float32)
        decoy[:, EMULATOR_PIXELS] = self.emulate(decoy_labels, decoy_dwarf)
        for start, stop in SEGMENTS:
            left = np.arange(start - 140, start)  # reflected about the segment's first pixel
            out[:, left] = decoy[:, 2 * start - 1 - left]
            right = np.arange(stop, stop + 140)
            out[:, right[right < N_PIXELS]] = decoy[:, 2 * stop - 1 - right[right < N_PIXELS]]
        for i in range(n):
            for gap_start, gap_stop in DR17_GAPS:
                a = 0 if gap_start == 0 else gap_start + rng.integers(-4, 5)
                b = N_PIXELS if gap_stop == N_PIXELS else gap_stop + rng.integers(-4, 5)
                out[i, a:b] = np.nan
        return out

    @staticmethod
    def continuum(n: int, rng: np.random.Generator) -> np.ndarray:
        """Un-normalised continua ``(n, 8575)``: log-normal level, global tilt, per-chip offset,
        slope and curvature, and a weak ripple (see the module docstring for the numbers)."""
        pixel = np.arange(N_PIXELS)
        u = pixel / (N_PIXELS - 1) - 0.5
        level = np.clip(np.exp(rng.normal(np.log(400.0), 1.2, (n, 1))), 5.0, 1e5)
        log_shape = rng.normal(-0.1, 0.1, (n, 1)) * u
        for lo, hi in CHIPS:
            x = np.zeros(N_PIXELS)
            x[lo:hi] = np.linspace(-1, 1, hi - lo)
            inside = np.zeros(N_PIXELS)
            inside[lo:hi] = 1.0
            offset = rng.normal(0, 0.08, (n, 1))
            slope = rng.normal(0, 0.05, (n, 1))
            curve = rng.normal(-0.04, 0.03, (n, 1))
            log_shape = log_shape + inside * (offset + slope * x + curve * x**2)
        period = rng.uniform(300, 3000, (n, 1))
        phase = rng.uniform(0, 2 * np.pi, (n, 1))
        log_shape = log_shape + rng.uniform(0, 0.01, (n, 1)) * np.sin(2 * np.pi * pixel / period + phase)
        return (level * np.exp(log_shape)).astype(np.float32)

    @staticmethod
    def sky_lines(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Night-sky line residuals, as in the DR17 files (5-45 per spectrum there, 2-4 pixels
        wide, flux up to 1.3-7x the continuum, error 20-50x the median): returns the error
        factor ``(n, 8575)`` (1 + bumps, log-normal heights of median 8) and the residual flux
        as a fraction of the continuum (80 % positive, log-normal of median 0.4, at most 8;
        negative ones at most -0.5). Positions are random: apStar is in the star's rest frame."""
        pixel = np.arange(N_PIXELS)
        factor = np.ones((n, N_PIXELS))
        residual = np.zeros((n, N_PIXELS))
        for i in range(n):
            centres = rng.uniform(0, N_PIXELS, rng.integers(10, 50))
            width = rng.uniform(0.8, 1.6, len(centres))
            near = np.abs(pixel[None, :] - centres[:, None]) < 8
            profile = np.exp(-0.5 * ((pixel[None, :] - centres[:, None]) / width[:, None]) ** 2) * near
            heights = np.exp(rng.normal(np.log(8.0), 0.9, len(centres)))
            amplitude = np.minimum(np.exp(rng.normal(np.log(0.4), 1.0, len(centres))), 8.0)
            amplitude = np.where(rng.uniform(size=len(centres)) < 0.8, amplitude, -np.minimum(amplitude, 0.5))
            factor[i] += (heights[:, None] * profile).sum(axis=0)
            residual[i] = (amplitude[:, None] * profile).sum(axis=0)
        return factor, residual.astype(np.float32)

    @staticmethod
    def error_spectrum(
        model_flux: np.ndarray, snr: np.ndarray, rng: np.random.Generator, sky_factor: np.ndarray | None = None
    ) -> np.ndarray:
        """1-sigma errors ``(N, 8575)``: ``k sqrt(flux + floor)`` times a per-chip gain and the
        sky-line factor, ``k`` set so the median S/N of the good pixels is ``snr``. Gaps: inf;
        runs beside the gaps and a few short runs inside the chips: 1e10-1e13 (bad pixels)."""
        n = len(model_flux)
        gap = ~np.isfinite(model_flux)
        flux = np.where(gap, 0.0, model_flux).astype(np.float64)
        level = np.nanmedian(np.where(gap, np.nan, flux), axis=1, keepdims=True)
        floor = rng.uniform(0.05, 1.0, (n, 1)) * level
        shape = np.sqrt(np.clip(flux, 0, None) + floor)
        for lo, hi in CHIPS:
            shape[:, lo:hi] *= np.exp(rng.normal(0, 0.1, (n, 1)))
        if sky_factor is not None:
            shape *= sky_factor
        ratio = np.where(gap, np.nan, flux / shape)
        scale = np.nanmedian(ratio, axis=1) / np.asarray(snr, dtype=np.float64).reshape(-1)
        error = shape * scale[:, None]
        error[gap] = np.inf
        bad = np.zeros_like(gap)
        for i in range(n):
            edges = np.flatnonzero(np.diff(gap[i].astype(np.int8)))  # last gap pixel / last data pixel
            for edge in edges:
                width = rng.integers(3, 40)
                if gap[i, edge]:  # gap → data: bad run starts after the gap
                    bad[i, edge + 1 : edge + 1 + width] = True
                else:  # data → gap
                    bad[i, max(edge + 1 - width, 0) : edge + 1] = True
            for _ in range(rng.integers(0, 12)):
                start = rng.integers(0, N_PIXELS - 10)
                bad[i, start : start + rng.integers(1, 9)] = True
        bad &= ~gap
        error[bad] = np.exp(rng.uniform(np.log(BAD_ERROR[0]), np.log(BAD_ERROR[1]), bad.sum()))
        return error.astype(np.float32)

    @staticmethod
    def observe(
        model_flux: np.ndarray, error: np.ndarray, rng: np.random.Generator, visit_style: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noisy ``(flux, ivar)`` float32 as read from an apStar row: Gaussian noise on the good
        pixels, smooth flux at bad pixels, gaps NaN (coadd rows) or 0 (``visit_style`` rows)."""
        noisy = np.isfinite(error) & (error < 1e5)
        flux = model_flux + np.where(noisy, error, 0).astype(np.float32) * rng.standard_normal(
            model_flux.shape, dtype=np.float32
        )
        with np.errstate(divide="ignore", over="ignore"):
            ivar = np.where(np.isfinite(error), 1.0 / error.astype(np.float64) ** 2, 0.0).astype(np.float32)
        gap = ~np.isfinite(error)
        if visit_style is not None:
            flux = np.where(gap & np.asarray(visit_style, bool)[:, None], np.float32(0), flux)
        return flux.astype(np.float32), ivar

    def generate(
        self,
        n: int,
        snr: float | np.ndarray | tuple[float, float],
        seed: int,
        labels: np.ndarray | None = None,
        dwarf: np.ndarray | None = None,
    ) -> SyntheticSpectra:
        """``n`` spectra from ``seed``. ``snr`` is one S/N, an array of ``n``, or a ``(low,
        high)`` range drawn log-uniformly. Labels are drawn from the prior unless given."""
        rng = np.random.default_rng(seed)
        if labels is None:
            labels, dwarf = self.draw_labels(n, rng)
        else:
            labels = np.asarray(labels, dtype=np.float64).reshape(n, 5)
            dwarf = np.zeros(n, bool) if dwarf is None else np.asarray(dwarf, bool)
        if isinstance(snr, tuple):
            snr_values = np.exp(rng.uniform(np.log(snr[0]), np.log(snr[1]), n))
        else:
            snr_values = np.broadcast_to(np.asarray(snr, dtype=np.float64), (n,)).copy()
        sky_factor, sky_residual = self.sky_lines(n, rng)
        model_flux = (self.normalised(labels, dwarf, rng) + sky_residual) * self.continuum(n, rng)
        error = self.error_spectrum(model_flux, snr_values, rng, sky_factor)
        flux, ivar = self.observe(model_flux, error, rng, visit_style=rng.uniform(size=n) < 0.5)
        return SyntheticSpectra(flux, ivar, labels, snr_values, dwarf, model_flux, error)


def generate(n: int, snr, seed: int, dwarf_fraction: float = 0.35) -> SyntheticSpectra:
    """Shortcut: ``SpectrumGenerator(dwarf_fraction).generate(n, snr, seed)``."""
    return SpectrumGenerator(dwarf_fraction).generate(n, snr, seed)
