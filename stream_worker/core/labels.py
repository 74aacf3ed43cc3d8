"""What a network's outputs mean: their order, how training normalised them, and how the raw
Monte Carlo spreads are calibrated into reported uncertainties.

A :class:`ModelCard` travels with the weights (the metadata JSON beside them; defaults:
APOGEENet III's, :data:`APOGEENET_III`), so the engine and the training code read the same
constants and a second model brings its own. Plain arithmetic: it works on floats, numpy arrays
and torch tensors alike, in their own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OUTPUT_NAMES = ("logg", "log10_teff", "fe_h")
"""The quantities a network may output, in any order."""

CALIBRATED = ("teff", "logg", "fe_h")
"""The parameters whose raw uncertainty is calibrated."""


class ModelCardError(ValueError):
    """The model metadata is incomplete or inconsistent; the message names the field."""


@dataclass(frozen=True)
class ModelCard:
    """``outputs``: the network's output columns in order; ``normalisation``: per output the
    ``(mean, scale)`` with ``physical = normalised * scale + mean``; ``calibration``: per parameter
    ``(scale, offset)`` with ``e = scale * raw_e + offset`` (the pipeline's post-hoc noise model)."""

    outputs: tuple[str, ...] = OUTPUT_NAMES
    normalisation: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "logg": (3.2, 1.2), "log10_teff": (3.7, 0.1), "fe_h": (-0.2, 0.3)})
    calibration: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "teff": (1.25, 10.0), "logg": (1.25, 0.01), "fe_h": (1.0, 0.01)})

    def __post_init__(self) -> None:
        if sorted(self.outputs) != sorted(OUTPUT_NAMES):
            raise ModelCardError(f"targets.order: expected a permutation of {list(OUTPUT_NAMES)}, found {list(self.outputs)}")
        for key, names, table in (("targets.normalisation", OUTPUT_NAMES, self.normalisation),
                                  ("calibration", CALIBRATED, self.calibration)):
            missing = sorted(set(names) - set(table))
            if missing or set(table) - set(names):
                raise ModelCardError(f"{key}: expected entries for {list(names)}, found {sorted(table)}")
            for name, pair in table.items():
                if len(pair) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair):
                    raise ModelCardError(f"{key}.{name}: expected two numbers, found {pair!r}")
        if any(self.normalisation[name][1] == 0 for name in OUTPUT_NAMES):
            raise ModelCardError("targets.normalisation: a scale of 0 cannot be undone")

    def column(self, name: str) -> int:
        """Index of output ``name`` among the network's outputs."""
        return self.outputs.index(name)

    def unnormalise(self, column, name: str):
        """One output column in physical units (``logg``, ``log10_teff`` or ``fe_h``)."""
        mean, scale = self.normalisation[name]
        return column * scale + mean

    def normalise(self, values, name: str):
        """Physical values of ``name`` as the network is trained to output them."""
        mean, scale = self.normalisation[name]
        return (values - mean) / scale

    def calibrate(self, raw: float | None, name: str) -> float | None:
        """The reported uncertainty of parameter ``name`` from its raw Monte Carlo spread."""
        if raw is None:
            return None
        scale, offset = self.calibration[name]
        return scale * raw + offset

    def to_metadata(self) -> dict:
        """The card as the metadata JSON beside a checkpoint records it."""
        return {
            "targets": {"order": list(self.outputs), "normalisation": {k: list(v) for k, v in self.normalisation.items()}},
            "calibration": {k: list(v) for k, v in self.calibration.items()},
        }

    @classmethod
    def from_metadata(cls, metadata: dict) -> ModelCard:
        """The card of a checkpoint's metadata JSON; what it leaves out is APOGEENet III's."""
        default = cls()
        targets = metadata.get("targets") or {}
        if not isinstance(targets, dict):
            raise ModelCardError(f"targets: expected a mapping, found {targets!r}")
        try:
            return cls(
                outputs=tuple(targets.get("order", default.outputs)),
                normalisation={k: tuple(v) for k, v in (targets.get("normalisation") or default.normalisation).items()},
                calibration={k: tuple(v) for k, v in (metadata.get("calibration") or default.calibration).items()},
            )
        except (AttributeError, TypeError) as exc:
            raise ModelCardError(f"model metadata is malformed: {exc}") from None


APOGEENET_III = ModelCard()
"""APOGEENet III's outputs, normalisation and calibration (``shared/reference/APOGEENET.md``)."""
