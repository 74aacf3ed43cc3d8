"""The apStar spectral grid every input must be on."""

N_PIXELS = 8575
"""Length of an apStar spectrum on the common log-lambda grid."""

GRID_CRVAL1 = 4.179
"""log10 of the first pixel's wavelength (Angstrom)."""

GRID_CDELT1 = 6e-6
"""Step of the grid in log10 wavelength."""
