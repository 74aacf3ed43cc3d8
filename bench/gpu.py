"""The engine on a GPU machine, in one prepared command: ``python -m bench.gpu [--out DIR]``.

Needs PyTorch and numpy only: no Java, no Kafka, no internet, no other package (the stream
worker's modules on this path import neither kafka-python, astropy nor pyyaml). Measures, at 20
Monte Carlo draws on the full-size network (random weights; speed does not depend on them):

1. the engine alone in exact and fast mode: spectra/s, peak GPU memory, the plan it chose;
2. the in-process pipeline (decode → validate → device preprocessing → network → records →
   JSON, no Kafka), in the worker's batches with the engine on a thread of its own, as the
   worker overlaps it: spectra/s, and the host CPU per spectrum at 20 draws and at 0 draws;
3. agreement: exact-mode records on the device against the SDSS reference loop on the CPU, on
   the same inputs and the same noise: the parameters to 1e-5 relative; the raw uncertainties,
   spreads of 20 nearly equal numbers whose rounding the convolution algorithm changes, to 1e-4
   (as tests/test_inference.py holds CPU FFT and direct sums to);
4. with ``--profile``, where one engine call's time goes in each mode (torch.profiler, the top
   operators by device time), so that a missed target comes with its profile from the same run.

A device's time is scarce and this code has not run on a GPU before, so a measurement that
raises is recorded with its error and the others still run; the exit code is then non-zero.

``--device cpu --network small --spectra 16`` runs it in seconds (tests/test_bench.py). Prints
one JSON object per measurement and writes ``gpu.json`` and ``gpu.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from devtools.samples import synthetic_spectra
from devtools.sdss_reference import reference_estimate
from stream_worker.core.records import KafkaSource, build_record
from stream_worker.core.spectrum import Spectrum, validate_spectrum
from stream_worker.engine.estimator import Estimator
from stream_worker.engine.preprocess import noise_draws
from stream_worker.engine.weights import random_model, resolve_device
from stream_worker.io.serializers import serializer
from stream_worker.io.wire import decode_input, encode_inline

NETWORKS = {
    "full": {},  # APOGEENet III, 72.6 M parameters
    "small": dict(channels=(4, 8), kernel_size=30, pooled_length=16, linear_width=32, linear_layers=2),
}
AGREEMENT = {"parameters": (("teff", "logg", "fe_h"), 1e-5),
             "raw uncertainties": (("raw_e_teff", "raw_e_logg", "raw_e_fe_h"), 1e-4)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> tuple[float, float]:
    """(wall seconds, host CPU seconds of this process) of ``function()``."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def engine_alone(model, device, precision: str, flux, ivar, ids, rounds: int) -> dict:
    engine = Estimator(model, num_draws=20, seed=0, device=device, precision=precision)
    engine.estimate(flux[:8], ivar[:8], ids[:8])  # warm-up: allocator, cuDNN autotuning
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walls = [timed(lambda: engine.estimate(flux, ivar, ids), device)[0] for _ in range(rounds)]
    return {
        "measurement": f"engine alone, {precision}", "spectra": len(ids), "draws": 20,
        "spectra_per_s": [round(len(ids) / w, 1) for w in walls],
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        "plan": engine.plan.label,
    }


def pipeline(model, device, draws: int, messages: list[bytes], rounds: int, batch_spectra: int) -> dict:
    """The worker's per-message work without Kafka, overlapped as the worker overlaps it (its
    module, ``stream_worker.streaming.worker``, needs kafka-python, which the device lacks): the
    messages go in batches of ``batch_spectra`` (the worker's ``batching.max_spectra``); the engine,
    built and run on one thread of its own, infers batch k while the main thread decodes and
    validates batch k+1 and builds and encodes batch k-1's records."""
    with ThreadPoolExecutor(1, thread_name_prefix="engine") as engine_thread:
        engine = engine_thread.submit(Estimator, model, num_draws=draws, seed=0, device=device).result()
        provenance, encode = engine.provenance, serializer("json").encode

        def infer(spectra: list[Spectrum]):
            return engine.estimate(np.stack([s.flux for s in spectra]), [s.ivar for s in spectra],
                                   [s.spectrum_id for s in spectra])

        def finish(first: int, spectra: list[Spectrum], job) -> list[bytes]:
            return [encode(build_record(s, e, provenance, KafkaSource("in", 0, first + i, 0)))
                    for i, (s, e) in enumerate(zip(spectra, job.result()))]

        def run(values: list[bytes]) -> list[bytes]:
            published: list[bytes] = []
            in_engine = None
            for first in range(0, len(values), batch_spectra):
                spectra = [validate_spectrum(decode_input(v)) for v in values[first : first + batch_spectra]]
                job = engine_thread.submit(infer, spectra)
                if in_engine:
                    published += finish(*in_engine)
                in_engine = (first, spectra, job)
            return published + finish(*in_engine) if in_engine else published

        run(messages[:8])
        rounds_out: list[list[bytes]] = []
        results = [timed(lambda: rounds_out.append(run(messages)), device) for _ in range(rounds)]
        published = [json.loads(value)["spectrum_id"] for value in rounds_out[-1]]
        if published != [decode_input(value).spectrum_id for value in messages]:
            raise RuntimeError("the pipeline did not give one record per message in input order")
    return {
        "measurement": f"in-process pipeline, exact, {draws} draws, batches of {batch_spectra}",
        "spectra": len(messages), "draws": draws,
        "spectra_per_s": [round(len(messages) / wall, 1) for wall, _ in results],
        "host_cpu_ms_per_spectrum": [round(1000 * cpu / len(messages), 3) for _, cpu in results],
    }


def profile(model, device, precision: str, flux, ivar, ids, out: Path) -> dict:
    """torch.profiler over one engine call at 20 draws: the top operators by time on the device
    (on a CPU, by CPU time), written to ``profile-<precision>.txt`` under ``out``."""
    engine = Estimator(model, num_draws=20, seed=0, device=device, precision=precision)
    engine.estimate(flux[:8], ivar[:8], ids[:8])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        engine.estimate(flux, ivar, ids)
        synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path = out / f"profile-{precision}.txt"
    path.write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=48))
    return {"measurement": f"profile, {precision}", "spectra": len(ids), "file": path.name, "plan": engine.plan.label}


def agreement(model, device, flux, ivar, ids) -> dict:
    """Exact-mode records on ``device`` against the one-at-a-time reference on the CPU, fed the
    noise the device drew (CUDA and CPU generators draw different numbers)."""
    estimates = Estimator(model, num_draws=20, seed=0, device=device).estimate(flux, ivar, ids)
    cpu_model = model.to("cpu")
    worst = dict.fromkeys(AGREEMENT, 0.0)
    for i, estimate in enumerate(estimates):
        noise = noise_draws(ids[i], 0, 20, flux.shape[1], device).cpu()
        with torch.no_grad():
            expected = reference_estimate(cpu_model, flux[i], ivar[i], noise)
        for group, (names, _) in AGREEMENT.items():
            worst[group] = max(worst[group], *(abs(getattr(estimate, k) - expected[k]) / abs(expected[k]) for k in names))
    return {"measurement": "exact on the device vs the reference on the CPU", "spectra": len(ids),
            "worst_relative_difference": worst, "limits": {g: limit for g, (_, limit) in AGREEMENT.items()},
            "agrees": all(worst[g] <= limit for g, (_, limit) in AGREEMENT.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--network", choices=sorted(NETWORKS), default="full")
    parser.add_argument("--spectra", type=int, default=2048, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agreement-spectra", type=int, default=4)
    parser.add_argument("--batch-spectra", default="64,512",
                        help="the in-process pipeline's batch sizes, comma-separated: the first is the worker's "
                             "default batching.max_spectra, and the one the 0-draws run uses")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile one engine call of N spectra in each mode")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    batch_sizes = [int(size) for size in args.batch_spectra.split(",")]
    device = resolve_device(args.device)
    model = random_model(device=device, seed=0, **NETWORKS[args.network])
    flux, ivar = synthetic_spectra(64, seed=1)
    pick = np.arange(args.spectra) % len(flux)
    flux, ivar = flux[pick], ivar[pick]
    ids = [f"gpu-bench-{i}" for i in range(args.spectra)]
    messages = [encode_inline(Spectrum(ids[i], flux[i], ivar[i])) for i in range(args.spectra)]
    args.out.mkdir(parents=True, exist_ok=True)
    n, p = args.agreement_spectra, args.profile
    measurements = [
        ("engine alone, exact", lambda: engine_alone(model, device, "exact", flux, ivar, ids, args.rounds)),
        ("engine alone, fast", lambda: engine_alone(model, device, "fast", flux, ivar, ids, args.rounds)),
        *[(f"in-process pipeline, exact, {draws} draws, batches of {size}",
           lambda draws=draws, size=size: pipeline(model, device, draws, messages, args.rounds, size))
          for draws, size in [(20, size) for size in batch_sizes] + [(0, batch_sizes[0])]],
        *[(f"profile, {mode}", lambda mode=mode: profile(model, device, mode, flux[:p], ivar[:p], ids[:p], args.out))
          for mode in ("exact", "fast") if p],
        ("exact on the device vs the reference on the CPU",
         lambda: agreement(model, device, flux[:n], ivar[:n], ids[:n])),
    ]
    rows = []
    for name, measure in measurements:
        try:
            rows.append(measure())
        except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
            rows.append({"measurement": name, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=8)})
        print(json.dumps(rows[-1]), flush=True)
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "network": args.network,
        "host_threads": torch.get_num_threads(),
        "peak_host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    (args.out / "gpu.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    (args.out / "gpu.md").write_text(markdown(machine, rows))
    return 0 if rows[-1].get("agrees") and not any("error" in row for row in rows) else 1


def markdown(machine: dict, rows: list[dict]) -> str:
    lines = [f"Device: {machine['device']}, torch {machine['torch']} (CUDA {machine['cuda']}), network "
             f"{machine['network']}, {machine['host_threads']} host threads.", "",
             "| measurement | spectra | spectra/s (rounds) | host CPU ms/spectrum | peak GPU MiB | plan |",
             "|---|---|---|---|---|---|"]
    for row in rows[:-1]:
        if "error" in row:
            lines.append(f"| {row['measurement']} | FAILED: {row['error']} | | | | |")
        elif "spectra_per_s" in row:
            lines.append(f"| {row['measurement']} | {row['spectra']} | {', '.join(map(str, row['spectra_per_s']))} | "
                         f"{', '.join(map(str, row.get('host_cpu_ms_per_spectrum', []))) or '—'} | "
                         f"{row.get('peak_gpu_mib') or '—'} | {row.get('plan', '—')} |")
    lines.append("")
    lines += [f"{row['measurement']}: `{row['file']}` ({row['spectra']} spectra, {row['plan']})."
              for row in rows if "file" in row]
    check = rows[-1]
    if "error" in check:
        lines += ["", f"{check['measurement']}: FAILED: {check['error']}", ""]
        return "\n".join(lines)
    worst = "; ".join(f"{group} {value:.2e} (limit {check['limits'][group]:.0e})"
                      for group, value in check["worst_relative_difference"].items())
    lines += ["", f"{check['measurement']}, worst relative difference over {check['spectra']} spectra: {worst}: "
                  f"{'agrees' if check['agrees'] else 'DISAGREES'}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
