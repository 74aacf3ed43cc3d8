"""From network outputs to physical parameters and their uncertainties.

The reported values come from the clean (un-noised) pass; the raw uncertainties are the unbiased
standard deviations of the Monte Carlo draws; the calibrated ones apply the pipeline's post-hoc
noise model. Pure functions on tensors and floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# (mean, scale) that undo the training normalisation, in the network's output order.
LOGG_NORM = (3.2, 1.2)
LOG_TEFF_NORM = (3.7, 0.1)
FE_H_NORM = (-0.2, 0.3)


def unnormalise(outputs: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` normalised outputs → ``[logg, log10 teff, fe_h]``, in the outputs' float32."""
    outputs = outputs.float()
    columns = [outputs[:, i] * scale + mean for i, (mean, scale) in enumerate((LOGG_NORM, LOG_TEFF_NORM, FE_H_NORM))]
    return torch.stack(columns, dim=1)


@dataclass(frozen=True)
class Estimate:
    """One spectrum's parameters; the ``raw_e_*`` and ``e_*`` are ``None`` without draws."""

    teff: float
    logg: float
    fe_h: float
    raw_e_teff: float | None = None
    raw_e_logg: float | None = None
    raw_e_fe_h: float | None = None

    @property
    def e_teff(self) -> float | None:
        return None if self.raw_e_teff is None else 1.25 * self.raw_e_teff + 10.0

    @property
    def e_logg(self) -> float | None:
        return None if self.raw_e_logg is None else 1.25 * self.raw_e_logg + 0.01

    @property
    def e_fe_h(self) -> float | None:
        return None if self.raw_e_fe_h is None else self.raw_e_fe_h + 0.01


class NonFiniteOutput(ArithmeticError):
    """The network produced NaN or infinity: no number from it may be reported."""


def summarise(clean: torch.Tensor, draws: torch.Tensor | None) -> Estimate:
    """One spectrum's estimate from its unnormalised clean output ``(3,)`` and draws ``(D, 3)``."""
    logg, log_teff, fe_h = (float(v) for v in clean)
    values = [logg, log_teff, fe_h]
    spread = None
    if draws is not None and draws.shape[0] > 0:
        spread = [float(v) for v in torch.std(draws, dim=0)]
        values += spread
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteOutput(f"network output is not finite: {values}")
    teff = 10.0**log_teff
    if spread is None:
        return Estimate(teff=teff, logg=logg, fe_h=fe_h)
    return Estimate(
        teff=teff,
        logg=logg,
        fe_h=fe_h,
        raw_e_teff=teff * spread[1] * math.log(10),
        raw_e_logg=spread[0],
        raw_e_fe_h=spread[2],
    )
