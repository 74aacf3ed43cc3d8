"""From network outputs to physical parameters and their raw Monte Carlo uncertainties.

The reported values come from the clean (un-noised) pass; the raw uncertainties are the unbiased
standard deviations of the draws. What the outputs mean (order, normalisation) is the model
card's (:class:`~stream_worker.core.labels.ModelCard`). Pure functions on tensors and floats.
"""

from __future__ import annotations

import math

import torch

from stream_worker.core.labels import ModelCard


def unnormalise(outputs: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """``(B, 3)`` normalised outputs → physical units in the card's output order, in float32."""
    outputs = outputs.float()
    return torch.stack([card.unnormalise(outputs[:, i], name) for i, name in enumerate(card.outputs)], dim=1)


class NonFiniteOutput(ArithmeticError):
    """The network produced NaN or infinity: no number from it may be reported."""


def summarise(clean: torch.Tensor, draws: torch.Tensor | None, card: ModelCard) -> tuple[float, float, float, tuple | None]:
    """``(teff, logg, fe_h, raw)`` of one spectrum from its unnormalised clean output ``(3,)`` and
    draws ``(D, 3)``; ``raw`` is ``(raw_e_teff, raw_e_logg, raw_e_fe_h)``, ``None`` without draws."""
    columns = [card.column(name) for name in ("logg", "log10_teff", "fe_h")]
    logg, log_teff, fe_h = (float(clean[i]) for i in columns)
    values = [logg, log_teff, fe_h]
    spread = None
    if draws is not None and draws.shape[0] > 0:
        std = torch.std(draws, dim=0)
        spread = [float(std[i]) for i in columns]
        values += spread
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteOutput(f"network output is not finite: {values}")
    teff = 10.0**log_teff
    if spread is None:
        return teff, logg, fe_h, None
    return teff, logg, fe_h, (teff * spread[1] * math.log(10), spread[0], spread[2])
