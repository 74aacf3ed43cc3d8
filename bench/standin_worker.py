"""``python -m bench.standin_worker run``: the real worker with its engine replaced by a stand-in of
fixed speed, for measuring the worker's pipelining without a GPU.

STANDIN_SPECTRA_PER_S=N  the stand-in computes N spectra per second: each batch sleeps
                         len(batch) / N seconds, releasing the GIL as a GPU call does, and
                         returns plausible estimates (0 or unset: no sleep, the host alone).

Everything else (Kafka, decode, validation, records, JSON, commits) is the real worker's; the
stand-in keeps the real (trivial) estimator's provenance and model card.
"""

import os
import sys
import time

from stream_worker.cli import main
from stream_worker.core.estimate import measured
from stream_worker.engine import estimator as estimator_module

SPECTRA_PER_S = float(os.environ.get("STANDIN_SPECTRA_PER_S", "0"))


class StandIn:
    """An engine of fixed speed with the real one's identity (provenance, card, device)."""

    def __init__(self, real) -> None:
        self.real = real
        self.provenance, self.card, self.device, self.num_draws = real.provenance, real.card, real.device, 0

    def estimate(self, flux, ivar, ids):
        seconds = len(ids) / SPECTRA_PER_S if SPECTRA_PER_S else 0.0
        if seconds:
            time.sleep(seconds)
        per_spectrum = seconds / max(len(ids), 1)
        return [measured(spectrum_id, 4800.0, 2.5, -0.1, (40.0, 0.05, 0.03), self.card, per_spectrum)
                for spectrum_id in ids]


real_from_config = estimator_module.Estimator.from_config
estimator_module.Estimator.from_config = classmethod(lambda cls, engine: StandIn(real_from_config(engine)))

sys.exit(main())
