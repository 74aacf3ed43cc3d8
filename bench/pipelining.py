"""The worker's pipelining and its host cost per spectrum, through a real local broker, no GPU needed.

``python -m bench.pipelining [--messages 3000] [--rounds 2]`` measures, rounds interleaved:

- **overlap**: the worker with a stand-in engine of fixed speed (``bench.standin_worker``: it
  sleeps, releasing the GIL, as a GPU call would) at several speeds, and with no engine time at
  all (the host-only rate), with ``worker.max_batches_in_flight`` 1 and 2;
- **host cost**: the worker process's CPU time (user + system, all threads) per spectrum with the
  real engine on a trivial network, at 0 and at 20 draws;
- **latency** at low traffic: a paced stream at a quarter of the slowest stand-in's speed.

and rewrites its section of ``BENCHMARKS.md`` (``bench.run`` includes it too).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.kafka_e2e import TRIVIAL_SIZES, run_worker_phase
from devtools.kafka_broker import LocalKafka
from stream_worker.engine.network import ApogeeNet

REPO = Path(__file__).resolve().parent.parent
SPEEDS = (500, 2000, 5000, 20000)
IN_FLIGHT = (1, 2)
BATCH = 64
BEGIN, END = "<!-- bench.pipelining: begin -->", "<!-- bench.pipelining: end -->"
HOST_COST = {
    "trivial network, 0 draws": (0, {}, {}),
    # libgomp's threads spin after each parallel region: the worker bounds that (stream_worker/__init__.py);
    # libgomp's own default and passive waiting show what the spinning costs
    "trivial network, 0 draws, GOMP_SPINCOUNT=300000 (libgomp's default)": (0, {"GOMP_SPINCOUNT": "300000"}, {}),
    "trivial network, 0 draws, OMP_WAIT_POLICY=PASSIVE": (0, {"OMP_WAIT_POLICY": "PASSIVE"}, {}),
    # one engine thread: what two OpenMP threads on 2 cores beside the Kafka client's cost
    "trivial network, 0 draws, engine.num_threads 1": (0, {}, {"engine__num_threads": 1}),
    "trivial network, 20 draws": (20, {}, {}),
}
"""Host-cost rows: draws, extra environment and settings of the real-engine worker on the trivial network."""


def measure(messages: int, rounds: int) -> dict:
    results: dict = {"overlap": {}, "host_cost": {}, "latency": {}}
    with tempfile.TemporaryDirectory() as directory, LocalKafka(Path(directory) / "kafka") as kafka:
        tmp = Path(directory)
        trivial = tmp / "trivial.pt"
        torch.save(ApogeeNet(**TRIVIAL_SIZES).state_dict(), trivial)
        count = 0

        def phase(module: str = "stream_worker", spectra_per_s: float | None = None, n: int = messages,
                  paced: float | None = None, env: dict | None = None, **settings) -> dict:
            nonlocal count
            count += 1
            env = {"STANDIN_SPECTRA_PER_S": str(spectra_per_s or 0), **(env or {})}
            return run_worker_phase(kafka, tmp, f"p{count}", trivial, n, paced, BATCH, module=module, extra_env=env,
                                    **settings)

        for round_ in range(rounds):
            print(f"round {round_ + 1} of {rounds} ...", file=sys.stderr)
            for in_flight in IN_FLIGHT:
                for speed in (None,) + SPEEDS:  # None: no engine time, the host alone
                    run = phase("bench.standin_worker", speed, worker__max_batches_in_flight=in_flight,
                                engine__num_draws=0)
                    results["overlap"].setdefault((speed, in_flight), []).append(run)
            for label, (draws, env, settings) in HOST_COST.items():
                run = phase(engine__num_draws=draws, n=messages if draws == 0 else messages // 10, env=env,
                            **settings)
                results["host_cost"].setdefault(label, []).append(run)
            for in_flight in IN_FLIGHT:
                run = phase("bench.standin_worker", SPEEDS[0], n=200, paced=SPEEDS[0] / 4,
                            worker__max_batches_in_flight=in_flight, engine__num_draws=0)
                results["latency"].setdefault(in_flight, []).append(run)
    return results


def value_range(values: list[float], digits: int = 0, percent: bool = False) -> str:
    low, high = min(values), max(values)
    spell = (lambda v: f"{v:.0%}") if percent else (lambda v: f"{v:,.{digits}f}")
    return spell(low) if spell(low) == spell(high) else f"{spell(low)}–{spell(high)}"


def section(results: dict, messages: int, rounds: int) -> str:
    overlap = results["overlap"]
    host = {k: [r["spectra_per_s"] for r in overlap[(None, k)]] for k in IN_FLIGHT}
    lines = [
        BEGIN,
        "## Pipelining: the worker with an engine of fixed speed (`python -m bench.pipelining`)",
        "",
        f"A backlog of {messages:,} real inline spectrum messages (69 kB each) drained by one worker process",
        "through the real local broker, batches of 64, the sustained rate counted after the first batch. The",
        "engine is a stand-in (`bench/standin_worker.py`) that takes exactly len(batch) / speed seconds per",
        "batch, sleeping as a GPU call would (the GIL released), so the rows show what the worker's host side",
        "lets a fast engine reach. Host only: the stand-in takes no time at all. Target: at every speed the",
        "worker reaches ≥ 90% of min(host-only rate, engine speed) with 2 batches in flight (the default).",
        f"Ranges over {rounds} interleaved rounds.",
        "",
        "| engine speed (spectra/s) | in flight 1 (spectra/s) | in flight 2 (spectra/s) | "
        "target: min(host, engine) | in flight 2 / target | in flight 1 / target |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for speed in (None,) + SPEEDS:
        rates = {k: [r["spectra_per_s"] for r in overlap[(speed, k)]] for k in IN_FLIGHT}
        target = min(statistics.median(host[2]), speed or float("inf"))
        lines.append(
            f"| {'host only' if speed is None else f'{speed:,}'} | {value_range(rates[1])} | {value_range(rates[2])} | "
            f"{target:,.0f} | {value_range([r / target for r in rates[2]], percent=True)} | "
            f"{value_range([r / target for r in rates[1]], percent=True)} |")
    cost = results["host_cost"]
    lines += [
        "",
        "### Host cost per spectrum",
        "",
        "The worker process's CPU time (user + system, every thread: Kafka clients, decode, the engine, records,",
        "JSON), from the first batch's results to the last, per spectrum; the real engine on a trivial network",
        "(the full network's arithmetic removed, its preprocessing kept). Target ≤ 0.4 CPU ms per spectrum at",
        "0 draws. The overlap rows' CPU per spectrum (stand-in engine: no engine arithmetic at all) is the",
        "host path alone.",
        "",
        "| worker | spectra | CPU ms per spectrum | spectra/s |",
        "|---|---:|---:|---:|",
    ]
    for label, runs in cost.items():
        lines.append(f"| {label} | {runs[0]['spectra']:,} | "
                     f"{value_range([r['cpu_ms_per_spectrum'] for r in runs], 2)} | "
                     f"{value_range([r['spectra_per_s'] for r in runs])} |")
    for in_flight in IN_FLIGHT:
        runs = overlap[(None, in_flight)]
        lines.append(f"| stand-in engine (host path only), in flight {in_flight} | {runs[0]['spectra']:,} | "
                     f"{value_range([r['cpu_ms_per_spectrum'] for r in runs], 2)} | "
                     f"{value_range([r['spectra_per_s'] for r in runs])} |")
    lines += [
        "",
        "### Latency at low traffic",
        "",
        f"200 spectra offered at {SPEEDS[0] / 4:.0f}/s to the stand-in of {SPEEDS[0]} spectra/s (batches fill for",
        "`batching.max_wait_seconds` = 0.5 s, then one engine pass): input timestamp to the result arriving at a",
        "consumer. Pipelining must not make it worse.",
        "",
        "| in flight | latency p50 (s) | latency p99 (s) |",
        "|---|---:|---:|",
    ]
    for in_flight, runs in results["latency"].items():
        lines.append(f"| {in_flight} | {value_range([r['latency_p50_s'] for r in runs], 3)} | "
                     f"{value_range([r['latency_p99_s'] for r in runs], 3)} |")
    return "\n".join(lines + [END]) + "\n"


def replace_section(document: str, text: str) -> str:
    """``document`` with the section ``text`` replaced (appended if it has none): the section is
    what lies between ``text``'s first and last lines, its begin and end markers."""
    lines = text.strip("\n").splitlines()
    pattern = re.compile(re.escape(lines[0]) + ".*?" + re.escape(lines[-1]) + "\n?", re.S)
    if pattern.search(document):
        return pattern.sub(lambda _: text, document)
    return document.rstrip("\n") + "\n\n" + text


def update_benchmarks(path: str | Path, text: str) -> None:
    """Replaces (or appends) ``text``'s section in the benchmarks file at ``path`` and prints it."""
    output = Path(path)
    output.write_text(replace_section(output.read_text() if output.exists() else "# Benchmarks\n", text))
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    update_benchmarks(args.output, section(measure(args.messages, args.rounds), args.messages, args.rounds))


if __name__ == "__main__":
    main()
