"""The operators' commands through a real local broker: how fast ``stream-worker replay``
reprocesses a range against the live worker on the same backlog, and how long a dead letter takes
from ``stream-worker redrive`` to its result.

``python -m bench.operations [--spectra 2000] [--rounds 2]`` (rounds interleave the worker and
the replay; the trivial network at 0 draws, so the I/O path is what is measured) rewrites its
section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.kafka_e2e import TRIVIAL_SIZES, encoded, produce, receive, run_worker_phase
from bench.pipelining import update_benchmarks, value_range
from bench.run import machine
from devtools.kafka_broker import LocalKafka
from devtools.samples import GIANT_FILE
from devtools.worker_process import WorkerProcess
from stream_worker.engine.network import ApogeeNet
from stream_worker.io.wire import encode_reference

REPO = Path(__file__).resolve().parent.parent
BATCH = 64
DEAD_LETTERS = 20
BEGIN, END = "<!-- bench.operations: begin -->", "<!-- bench.operations: end -->"


def command(kafka: LocalKafka, *argv: str, **settings) -> tuple[float, subprocess.CompletedProcess]:
    """Runs ``stream-worker argv`` to its end; its wall time and what it printed."""
    env = {f"STREAM_WORKER__{k.upper()}": str(v) for k, v in settings.items()}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "stream_worker", *argv, "--bootstrap", kafka.bootstrap], cwd=REPO,
                          env={**_base_env(), **env}, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"stream-worker {argv[0]} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.monotonic() - started, done


def _base_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAM_WORKER__")}


def replay_rate(kafka: LocalKafka, weights: Path, n: int, name: str) -> dict:
    """``n`` spectra waiting in a topic, replayed from the start into a new topic: the sustained
    rate after the first batch (as the worker's is counted) and the command's whole wall time."""
    topics = {k: f"{name}-{k}" for k in ("in", "out", "dlq")}
    for topic, partitions in (("in", 4), ("out", 4), ("dlq", 1)):
        kafka.create_topic(topics[topic], partitions)
    produce(kafka.bootstrap, topics["in"], encoded(n, name))
    wall, _ = command(kafka, "replay", "--from", "1d", "--group", f"{name}-replay", "--topic", topics["in"],
                      "--output-topic", topics["out"], kafka__dead_letter_topic=topics["dlq"],
                      kafka__compression_type="null", engine__weights=weights, engine__num_draws=0,
                      batching__max_spectra=BATCH, logging__format="text")
    published = sorted(_instant(r["published_at"]) for _, r in receive(kafka.bootstrap, topics["out"], n, 120))
    return {"spectra_per_s": (n - BATCH) / (published[-1] - published[BATCH - 1]), "wall_s": wall,
            "overall_per_s": n / wall}


def redrive_round_trip(kafka: LocalKafka, tmp: Path, weights: Path, name: str) -> dict:
    """``DEAD_LETTERS`` references to a file that is not there yet are dead-lettered by a live
    worker; the file appears; from the start of ``stream-worker redrive`` to the last result."""
    topics = {k: f"{name}-{k}" for k in ("in", "out", "dlq")}
    for topic, partitions in (("in", 4), ("out", 4), ("dlq", 1)):
        kafka.create_topic(topics[topic], partitions)
    roots = tmp / name
    roots.mkdir()
    late = roots / "arrives-later.fits"
    worker = WorkerProcess(tmp / f"{name}.log", cwd=REPO, kafka__bootstrap_servers=f"[{kafka.bootstrap}]",
                           kafka__input_topics=f"[{topics['in']}]", kafka__output_topic=topics["out"],
                           kafka__dead_letter_topic=topics["dlq"], kafka__group_id=name, engine__weights=weights,
                           engine__num_draws=0, inputs__data_roots=f"[{roots}]", batching__max_wait_seconds=0.05)
    try:
        worker.wait_ready(120)
        produce(kafka.bootstrap, topics["in"], [(f"late-{i}".encode(), encode_reference(str(late), 2, f"late-{i}"))
                                                for i in range(DEAD_LETTERS)])
        deadline = time.monotonic() + 60
        while worker.metric("stream_worker_dead_letters_total") < DEAD_LETTERS and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.copy(GIANT_FILE, late)
        started = time.time()
        wall, _ = command(kafka, "redrive", "--topic", topics["dlq"], "--group", f"{name}-redrive")
        arrivals = receive(kafka.bootstrap, topics["out"], DEAD_LETTERS, 120)
        assert worker.terminate() == 0
    finally:
        worker.close()
    return {"redrive_s": wall, "round_trip_s": max(t for t, _ in arrivals) - started}


def _instant(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def measure(n: int, rounds: int) -> dict:
    results: dict = {"worker": [], "replay": [], "redrive": []}
    with tempfile.TemporaryDirectory() as directory, LocalKafka(Path(directory) / "kafka") as kafka:
        tmp = Path(directory)
        weights = tmp / "trivial.pt"
        torch.save(ApogeeNet(**TRIVIAL_SIZES).state_dict(), weights)
        for round_ in range(rounds):
            print(f"round {round_ + 1} of {rounds} ...", file=sys.stderr)
            results["worker"].append(run_worker_phase(kafka, tmp, f"w{round_}", weights, n, None, BATCH,
                                                      engine__num_draws=0))
            results["replay"].append(replay_rate(kafka, weights, n, f"r{round_}"))
            results["redrive"].append(redrive_round_trip(kafka, tmp, weights, f"d{round_}"))
    return results


def section(results: dict, n: int, rounds: int) -> str:
    worker, replay, redrive = results["worker"], results["replay"], results["redrive"]
    lines = [BEGIN, "## Operators' commands: replay and redrive (`python -m bench.operations`)", "",
             f"`python -m bench.operations --spectra {n} --rounds {rounds}` on {machine()}; trivial network, "
             "0 draws, real local broker, rounds interleaved; ranges over rounds.", "",
             "| | spectra/s after the first batch | whole command |", "|---|---|---|",
             f"| live worker, {n}-message backlog | {value_range([r['spectra_per_s'] for r in worker])} | |",
             f"| `stream-worker replay` of the same backlog | {value_range([r['spectra_per_s'] for r in replay])} | "
             f"{value_range([r['wall_s'] for r in replay], 1)} s ({value_range([r['overall_per_s'] for r in replay])}"
             " spectra/s with start-up) |", "",
             f"Re-drive: {DEAD_LETTERS} dead letters (a referenced file that was missing, then appeared) sent back "
             f"by `stream-worker redrive` (its process: {value_range([r['redrive_s'] for r in redrive], 1)} s, "
             "start-up included), to the last of their results from the live worker: "
             f"{value_range([r['round_trip_s'] for r in redrive], 1)} s.", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectra", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    update_benchmarks(args.output, section(measure(args.spectra, args.rounds), args.spectra, args.rounds))


if __name__ == "__main__":
    main()
