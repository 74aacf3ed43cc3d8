"""One engine measurement in a process of its own, so its peak memory is its own.

``python -m bench.engine --mode baseline|exact|fast --spectra N [--weights PATH] --out result.npz``
prints a JSON line (spectra/s, peak RSS) and saves the raw outputs for accuracy comparisons.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from devtools.samples import DWARF_FILE, GIANT_FILE
from devtools.sdss_reference import reference_estimate
from stream_worker.core.labels import APOGEENET_III
from stream_worker.engine.estimator import Estimator
from stream_worker.engine.host_memory import freed_memory_kept
from stream_worker.engine.preprocess import noise_draws
from stream_worker.engine.weights import load_model, random_model
from stream_worker.io.apstar import read_apstar

OUTPUTS = ("teff", "logg", "fe_h", "raw_e_teff", "raw_e_logg", "raw_e_fe_h", "e_teff", "e_logg", "e_fe_h")


def real_spectra(n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The six real DR17 spectra (coadds and visits), repeated under distinct ids (distinct noise)."""
    spectra = read_apstar(GIANT_FILE, visits=True) + read_apstar(DWARF_FILE, visits=True)
    chosen = [spectra[i % len(spectra)] for i in range(n)]
    return (np.stack([s.flux for s in chosen]), np.stack([s.ivar for s in chosen]),
            [f"bench-{i}:{s.spectrum_id}" for i, s in enumerate(chosen)])


def synthetic_spectra(n: int, snr: float = 100.0, seed: int = 4242) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` distinct emulated spectra (labels from the training prior, a seed training never used):
    a realistic spread of inputs for judging a trained model's fast-mode accuracy."""
    from devtools.synthetic import SpectrumGenerator

    spectra = SpectrumGenerator().generate(n, snr, seed=seed)
    return spectra.flux, spectra.ivar, [f"bench-synthetic-{i}" for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("baseline", "exact", "fast"), required=True)
    parser.add_argument("--spectra", type=int, default=24)
    parser.add_argument("--weights", default=None, help="default: full-size random weights")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--inputs", choices=("real", "synthetic"), default="real",
                        help="the real DR17 spectra repeated, or distinct synthetic ones at S/N 100")
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile", default=None, help="also write torch.profiler's top operators here")
    args = parser.parse_args()
    if args.profile and args.mode == "baseline":
        parser.error("--profile profiles the engine; the baseline is the SDSS loop")
    model = load_model(args.weights, device="cpu") if args.weights else random_model(device="cpu", seed=0)
    flux, ivar, ids = (real_spectra if args.inputs == "real" else synthetic_spectra)(args.spectra)
    if args.mode == "baseline":  # no Estimator here: it would change this process's malloc settings
        def estimate(flux, ivar, ids) -> list[dict]:
            rows = [reference_estimate(model, flux[i], ivar[i], noise_draws(ids[i], 0, args.draws, flux.shape[1]))
                    for i in range(len(ids))]
            for row in rows:  # the calibrated errors as the pipeline's noise model gives them
                row.update({f"e_{name}": APOGEENET_III.calibrate(row[f"raw_e_{name}"], name)
                            for name in ("teff", "logg", "fe_h")})
            return rows
    else:
        engine = Estimator(model, num_draws=args.draws, precision=args.mode, batch_size=args.batch_size)

        def estimate(flux, ivar, ids) -> list[dict]:
            return [result.science() for result in engine.estimate(flux, ivar, ids)]
    estimate(flux[:2], ivar[:2], ["warm-0", "warm-1"])  # first-call allocations are not throughput
    started = time.perf_counter()
    rows = estimate(flux, ivar, ids)
    seconds = time.perf_counter() - started
    if args.profile:
        with torch.profiler.profile() as profiler:
            engine.estimate(flux[:6], ivar[:6], ids[:6])
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=36)
        open(args.profile, "w").write(table)
    np.savez(args.out, **{name: np.array([row[name] for row in rows], dtype=float) for name in OUTPUTS})
    print(json.dumps({
        "mode": args.mode, "spectra": len(ids), "seconds": seconds, "spectra_per_s": len(ids) / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(), "batch_size": None if args.mode == "baseline" else engine.batch_size,
        "plan": "the SDSS loop" if args.mode == "baseline" else engine.plan.label,
        "freed_memory_kept": freed_memory_kept(),
    }))


if __name__ == "__main__":
    main()
